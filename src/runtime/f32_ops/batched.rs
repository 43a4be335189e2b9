//! Products of many rows by a non-constant matrix, one per batch index: the encoder's attention,
//! `q·kᵀ` and `p·v` for each of 12 heads (197 × 64 × 197). tract runs a head's product at a time,
//! each split into tiles for its pool, and gained nothing from a second thread (27–35 ms of the
//! encoder at 1 and 2 threads, README "Performance"). Here rten-gemm's f32 kernel multiplies the
//! operands where they lie (it packs them itself), heads spread across the node's threads.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use rten_gemm::{GemmError, GemmExecutor, GemmInputA, GemmInputB, GemmUninitOptions};
use rten_tensor::{Matrix, NdTensorView};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{ProductAxes, ProductLayout};
use crate::runtime::helper_thread::{self, Disjoint};
use crate::runtime::int8::{on_helper, with_threads, written_tensor};

/// `out[batch.., m, n] = Σ_k a[batch.., m, k] · b[batch.., k, n]` for f32 operands whose axes
/// are given by an `EinSum` (any order, batch axes broadcast), on rten-gemm, the batch indices
/// (heads) split across the threads set by `runtime::set_threads`.
///
/// Accuracy: rten-gemm sums k in its own blocked order with FMA, like tract's kernel but not in
/// the same order: results differ from tract's by f32 rounding (`tests/f32_ops.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchedMatMul {
    pub(super) axes: ProductAxes,
}

/// The f32 executor, chosen once for this CPU.
fn executor() -> &'static GemmExecutor<f32> {
    // Leaked once: the executor is Sync but not Send, so it cannot sit in a OnceLock itself.
    static EXECUTOR: OnceLock<&'static GemmExecutor<f32>> = OnceLock::new();
    EXECUTOR.get_or_init(|| Box::leak(Box::new(GemmExecutor::default())))
}

impl Op for BatchedMatMul {
    fn name(&self) -> StaticName {
        "BatchedMatMul".into()
    }
    op_as_typed_op!();
}

impl EvalOp for BatchedMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.axes.with_operands(inputs, eval_on)
    }
}

/// The product of `a` and `b` laid out as `l` says.
fn eval_on(l: ProductLayout, a: &[f32], b: &[f32]) -> TractResult<TVec<TValue>> {
    let batches: Vec<(usize, usize, usize)> = l.batches().collect();
    let each = l.md * l.nd;
    if each == 0 || l.kd == 0 {
        return Ok(tvec![Tensor::zero::<f32>(&l.shape)?.into_tvalue()]);
    }
    let mut done = Ok(());
    // Safety: `products` writes every batch's whole [m, n] (the batches cover the output once);
    // on an error, zeros.
    let out = unsafe {
        written_tensor(&l.shape, |out| {
            done = products(&l, a, b, &batches, out);
            if done.is_err() {
                out.fill(MaybeUninit::new(0.0));
            }
        })?
    };
    done?;
    Ok(tvec![out.into_tvalue()])
}

/// `data[off..]` as an `[m, n]` matrix with these strides.
fn view(data: &[f32], off: usize, shape: [usize; 2], strides: [usize; 2]) -> TractResult<Matrix<'_, f32>> {
    NdTensorView::from_slice_with_strides(shape, &data[off..], strides).map_err(|e| format_err!("BatchedMatMul: operand view: {e:?}"))
}

/// Each batch's `[m, n]` product into its place in `out`, the batches on the threads of
/// `runtime::set_threads` (on the calling thread for one). rten-gemm writes an `[m, n]` whole:
/// where the output orders its axes otherwise (`p·v` gives `[1, 197, heads, 64]`), each batch
/// goes through a scratch matrix and is placed by the thread that computed it.
fn products(l: &ProductLayout, a: &[f32], b: &[f32], batches: &[(usize, usize, usize)], out: &mut [MaybeUninit<f32>]) -> TractResult<()> {
    let lhs = batches.iter().map(|&(oa, _, _)| view(a, oa, [l.md, l.kd], [l.ma, l.ka]).map(GemmInputA::Unpacked)).collect::<TractResult<Vec<_>>>()?;
    let rhs = batches.iter().map(|&(_, ob, _)| view(b, ob, [l.kd, l.nd], [l.kb, l.nb]).map(GemmInputB::Unpacked)).collect::<TractResult<Vec<_>>>()?;
    let gemm = executor();
    let each = l.md * l.nd;
    let in_order = l.no == 1 && l.mo == l.nd && batches.iter().enumerate().all(|(i, &(_, _, oo))| oo == i * each);
    let out = Disjoint::new(out);
    // Batches `r` one after the other, each into its place.
    let in_turn = |r: Range<usize>| -> Result<(), GemmError> {
        let mut scratch: Vec<MaybeUninit<f32>> = Vec::new();
        for i in r {
            let (x, y) = (lhs[i], rhs[i]);
            if in_order {
                // Safety: batch i's own elements.
                let o = unsafe { out.slice(i * each..(i + 1) * each) };
                gemm.gemm_uninit(o, x, y, GemmUninitOptions::default())?;
            } else {
                scratch.resize(each, MaybeUninit::uninit());
                let product = gemm.gemm_uninit(&mut scratch, x, y, GemmUninitOptions::default())?;
                let oo = batches[i].2;
                for (mi, row) in product.chunks_exact(l.nd).enumerate() {
                    for (ni, &v) in row.iter().enumerate() {
                        let at = oo + mi * l.mo + ni * l.no;
                        // Safety: batch i's own element (the batches place each output once).
                        unsafe { out.write(at, MaybeUninit::new(v)) };
                    }
                }
            }
        }
        Ok(())
    };
    let n = batches.len();
    let done = if on_helper(l.md) && n > 1 {
        // 2 threads: half the heads on the helper thread (see `int8::on_helper`).
        let second = Mutex::new(Ok(()));
        let mut first = Ok(());
        helper_thread::join(|| first = in_turn(0..n.div_ceil(2)), || *second.lock().unwrap_or_else(|e| e.into_inner()) = in_turn(n.div_ceil(2)..n));
        first.and(second.into_inner().unwrap_or_else(|e| e.into_inner()))
    } else {
        with_threads(l.md, || {
            use rayon::prelude::*;
            if rayon::current_num_threads() > 1 {
                (0..n).into_par_iter().try_for_each(|i| in_turn(i..i + 1))
            } else {
                in_turn(0..n)
            }
        })
    };
    done.map_err(|e| format_err!("BatchedMatMul: {e:?}"))
}

impl TypedOp for BatchedMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.axes.output_facts(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.axes.cost(inputs)
    }

    as_op!();
}
