//! f32 operators of a graph swapped at load for ones that are faster here (issue #15); the
//! graph, the optimizer and the executor stay tract's.
//!
//! - **Softmax over the last axis, any row length** ([`RowSoftmax`], rten-vecmath's vectorized
//!   softmax). On x86-64 tract's fused row kernel is absent and its per-row path cost 36 of the
//!   int8 encoder's ~220 ms (ViT's rows are 197 long), ~6 ns per element.
//! - **Products of a few rows by a non-constant matrix** ([`FewRowMatMul`]): a decoder step's
//!   attention, `q·kᵀ` and `p·v` over the cached keys/values. tract packs the right operand at
//!   every call (it cannot keep a non-constant operand packed), which for one query row costs more
//!   than the product: ~6 ms per token re-packing the cross-attention keys/values. Here each
//!   output is a dot product over contiguous memory (`q·kᵀ`) or a sum of contiguous rows
//!   (`p·v`), reading the operand once, unpacked.
//! - **Products of many rows by a non-constant matrix** ([`BatchedMatMul`]): the encoder's
//!   attention, each head's product on rten-gemm's f32 kernel, the heads across threads.
//! - **Axis moves that keep the last axis** ([`MoveAxisRows`]): the encoder's cross-attention
//!   keys/values into heads, each row copied once, halved on 2 threads.
//!
//! Accuracy: rten-vecmath's softmax is within 3 ulp of the definition (its own tests); the
//! products sum in another order than tract's (8 partial sums), a difference of the order of
//! f32 rounding. `tests/f32_ops.rs` checks both against tract's own operators on random shapes.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::{GeluExact, Softmax, SoftmaxKind};

use super::graph::swap_node;

mod batched;
mod layer_norm;
mod move_axis;
pub use batched::BatchedMatMul;
pub use layer_norm::LayerNormRows;
pub use move_axis::MoveAxisRows;

/// Which f32 operators to swap (`VITGPT2_F32_OPS=tract` keeps tract's own, for comparison).
pub fn enabled_from_env() -> bool {
    std::env::var("VITGPT2_F32_OPS").as_deref() != Ok("tract")
}

/// Rows known at load below which a product with a non-constant right operand is a
/// [`FewRowMatMul`] (a decoder step has 1; the encoder's attention has 197).
const FEW_ROWS: usize = 16;

/// Replaces tract's f32 softmax over the last axis by [`RowSoftmax`], its f32 `GeluExact` by
/// [`GeluExactRows`], its f32 products of two non-constant operands by [`FewRowMatMul`]
/// (under 16 rows) or [`BatchedMatMul`], its f32 axis moves that keep the last axis by
/// [`MoveAxisRows`], and its layer normalizations by [`LayerNormRows`]. Run it
/// between tract's `declutter` and `optimize`. Returns how many nodes it replaced.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let replacement: Option<Box<dyn TypedOp>> = if let Some(sm) = node.op_as::<Softmax>() {
            let fact = model.outlet_fact(node.inputs[0])?;
            (sm.kind == SoftmaxKind::Softmax
                && sm.quant_output_dt.is_none()
                && fact.datum_type == f32::datum_type()
                && fact.rank() >= 1
                && *sm.axes == [fact.rank() - 1])
                .then(|| Box::new(RowSoftmax) as _)
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            match ProductAxes::plan(model, node, einsum)? {
                Some((axes, rows)) if rows < FEW_ROWS => Some(Box::new(FewRowMatMul { axes }) as _),
                Some((axes, _)) => Some(Box::new(BatchedMatMul { axes }) as _),
                None => None,
            }
        } else if let Some(ew) = node.op_as::<ElementWiseOp>() {
            let f32_in = model.outlet_fact(node.inputs[0])?.datum_type == f32::datum_type();
            (ew.0.is::<GeluExact>() && ew.1.is_none() && f32_in).then(|| Box::new(GeluExactRows) as _)
        } else if let Some(&AxisOp::Move(from, to)) = node.op_as::<AxisOp>() {
            let fact = model.outlet_fact(node.inputs[0])?;
            MoveAxisRows::new(from, to, fact.rank()).filter(|_| fact.datum_type == f32::datum_type()).map(|op| Box::new(op) as _)
        } else {
            None
        };
        let Some(op) = replacement else { continue };
        let inputs = node.inputs.clone();
        swap_node(model, id, op, &inputs)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done + layer_norm::substitute(model)?)
}

/// `y = x/2 · (1 + erf(x/√2))` (f32, any shape), tract's `GeluExact` computed the same way
/// (its erf kernel, its order of operations: the same bits), but with 2 threads its rows halved
/// on the helper thread (`int8::on_helper`): tract's element-wise ops split through rayon's
/// pool, whose workers sleep between ops, and its 12 GELUs of the encoder took 8.9 ms on 2
/// threads against 5.0 on 1 (README "Performance").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GeluExactRows;

impl Op for GeluExactRows {
    fn name(&self) -> StaticName {
        "GeluExactRows".into()
    }
    op_as_typed_op!();
}

impl EvalOp for GeluExactRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = args_1!(inputs).into_tensor();
        let row = t.shape().last().copied().unwrap_or(1).max(1);
        {
            let mut ram = t.try_as_plain_ram_mut()?;
            let data = ram.as_slice_mut::<f32>()?;
            if super::int8::on_helper(data.len() / row) {
                let [a, b] = super::helper_thread::join_rows(data, row, |_, chunk| gelu_exact(chunk));
                a.and(b)?;
            } else {
                let total = data.len();
                tract_linalg::multithread::par_chunks_mut(data, 1, total, |_, chunk| gelu_exact(chunk))?;
            }
        }
        Ok(tvec![t.into_tvalue()])
    }
}

/// tract-core 0.23's `GeluExact` on f32 (src/ops/nn/gelu_exact.rs), chunk by chunk.
pub(crate) fn gelu_exact(xs: &mut [f32]) -> TractResult<()> {
    GeluExactF32::new()?.run(xs)
}

/// [`gelu_exact`] keeping tract's erf kernel and its scratch between calls (a product's rows
/// each get theirs right after their dequantization: `int8::columns`).
pub(crate) struct GeluExactF32 {
    erf: Box<dyn tract_linalg::element_wise::ElementWise<f32>>,
    scratch: Vec<f32>,
}

impl GeluExactF32 {
    /// Chunks the erf kernel runs on.
    const CHUNK: usize = 1024;

    pub(crate) fn new() -> TractResult<Self> {
        Ok(GeluExactF32 { erf: tract_linalg::routines::Func::Erf.ew_f32()?, scratch: vec![0f32; Self::CHUNK] })
    }

    /// `x/2 · (1 + erf(x/√2))` in place, each element as tract computes it.
    pub(crate) fn run(&mut self, xs: &mut [f32]) -> TractResult<()> {
        let c = 2f32.sqrt().recip();
        for chunk in xs.chunks_mut(Self::CHUNK) {
            let scaled = &mut self.scratch[..chunk.len()];
            scaled.iter_mut().zip(chunk.iter()).for_each(|(s, x)| *s = *x * c);
            self.erf.run(scaled)?;
            chunk.iter_mut().zip(scaled.iter()).for_each(|(x, e)| *x = (*x * 0.5) * (*e + 1.0));
        }
        Ok(())
    }
}

impl TypedOp for GeluExactRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![inputs[0].without_value()])
    }
    as_op!();
}

/// `y = softmax(x)` over the last axis (f32, any shape, any row length), in place where the
/// input buffer is not shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowSoftmax;

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }
    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = args_1!(inputs).into_tensor();
        let row = *t.shape().last().context("RowSoftmax: scalar input")?;
        if row > 0 {
            let mut ram = t.try_as_plain_ram_mut()?;
            let data = ram.as_slice_mut::<f32>()?;
            let total = data.len();
            let rows_of = |chunk: &mut [f32]| chunk.chunks_exact_mut(row).for_each(softmax_row);
            if super::int8::on_helper(total / row) {
                // 2 threads: half the rows on the helper thread (see `int8::on_helper`).
                super::helper_thread::join_rows(data, row, |_, chunk| rows_of(chunk));
            } else {
                // tract's helper: rows split across its executor's threads when it has several.
                tract_linalg::multithread::par_chunks_mut(data, row, total, |_, chunk| {
                    rows_of(chunk);
                    Ok(())
                })?;
            }
        }
        Ok(tvec![t.into_tvalue()])
    }
}

/// One row, in place (rten-vecmath, dispatched to the widest SIMD this CPU has).
pub fn softmax_row(row: &mut [f32]) {
    use rten_simd::SimdOp;
    rten_vecmath::Softmax::new_mut(row).dispatch();
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![inputs[0].without_value()])
    }
    as_op!();
}

/// `out[batch.., m, n] = Σ_k a[batch.., m, k] · b[batch.., k, n]` for f32 operands whose axes
/// are given by an `EinSum` (any order), `b` read where it lies, unpacked. Batch axes broadcast
/// (size 1 on one side, as the cross-attention keys of one image against a beam's queries).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FewRowMatMul {
    axes: ProductAxes,
}

/// Where a plain product's axes lie in its operands and output (from an `EinSum`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ProductAxes {
    /// Per output axis: its position in a and in b (`None` where absent; neither: a unit axis).
    out_axes: Vec<(Option<usize>, Option<usize>)>,
    /// The contracted axis in a and in b.
    k: (usize, usize),
    /// The row axis in the output (absent: one row), and the column axis in the output.
    m_out: Option<usize>,
    n_out: usize,
}

impl ProductAxes {
    /// The axes of `node` and its rows known at load (symbols count as 1) if it is a plain f32
    /// product (one contracted axis, at most one row axis, one column axis, every other axis in
    /// all three) of two non-constant operands.
    fn plan(model: &TypedModel, node: &TypedNode, op: &EinSum) -> TractResult<Option<(Self, usize)>> {
        let facts = model.node_input_facts(node.id)?;
        if op.q_params.is_some() || facts.len() != 2 || op.operating_dt != f32::datum_type() {
            return Ok(None);
        }
        if facts.iter().any(|f| f.datum_type != f32::datum_type()) || facts[1].konst.is_some() || facts[0].konst.is_some() {
            return Ok(None);
        }
        let (mut contracted, mut rows_axes, mut cols_axes) = (vec![], vec![], vec![]);
        let mut out_axes = vec![(None, None); op.axes.rank(InOut::Out(0))];
        for axis in op.axes.iter_all_axes() {
            let (ia, ib, io) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
            if ia.len() > 1 || ib.len() > 1 || io.len() > 1 {
                return Ok(None);
            }
            match (ia.first(), ib.first(), io.first()) {
                (Some(&a), Some(&b), None) => contracted.push((a, b)),
                (Some(&a), None, Some(&o)) => {
                    rows_axes.push((a, o));
                    out_axes[o] = (Some(a), None);
                }
                (None, Some(&b), Some(&o)) => {
                    cols_axes.push((b, o));
                    out_axes[o] = (None, Some(b));
                }
                (Some(&a), Some(&b), Some(&o)) => out_axes[o] = (Some(a), Some(b)),
                // Unit axes tract's declutter leaves on one side only (a one-row query's m axis
                // in a but not the output of q·kᵀ, or in the output only of p·v).
                (Some(&a), None, None) if facts[0].shape[a].is_one() => {}
                (None, Some(&b), None) if facts[1].shape[b].is_one() => {}
                (None, None, Some(_)) => {}
                _ => return Ok(None),
            }
        }
        // One contracted, one row and one column axis; any other of these kinds only of size 1
        // (one head, say; it then indexes like a batch axis). A product over a length-1 axis
        // (one cached key) is still a product: then any of them serves.
        fn pick<T: Copy>(v: &[T], unit: impl Fn(&T) -> bool) -> Result<Option<T>, ()> {
            let mut real = v.iter().filter(|c| !unit(c));
            let first = real.next();
            if real.next().is_some() {
                return Err(());
            }
            Ok(first.copied())
        }
        let (sa, sb) = (&facts[0].shape, &facts[1].shape);
        let (Ok(k), Ok(m), Ok(n)) = (
            pick(&contracted, |&(a, b)| sa[a].is_one() && sb[b].is_one()).map(|k| k.or(contracted.first().copied())),
            pick(&rows_axes, |&(a, _)| sa[a].is_one()),
            pick(&cols_axes, |&(b, _)| sb[b].is_one()).map(|n| n.or(cols_axes.first().copied())),
        ) else {
            return Ok(None);
        };
        let (Some(k), Some((_, n_out))) = (k, n) else { return Ok(None) };
        // A symbolic row count is the decoder's batch (1, or the beam width): the cross-attention
        // keys of one image are shared by every sequence, so tract puts the sequences on the
        // row axis. As in `int8::substitute`, symbols count as 1.
        let rows = match m {
            Some((a, _)) => sa[a].to_usize().unwrap_or(1),
            None => 1,
        };
        Ok(Some((ProductAxes { out_axes, k, m_out: m.map(|(_, o)| o), n_out }, rows)))
    }
}

impl Op for FewRowMatMul {
    fn name(&self) -> StaticName {
        "FewRowMatMul".into()
    }
    op_as_typed_op!();
}

/// Strides (in elements) of a row-major shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// One call's sizes and strides (in elements) of a [`ProductAxes`] product.
pub(crate) struct ProductLayout {
    /// The output's shape, row-major.
    shape: Vec<usize>,
    /// Sizes of k, m (1 where absent) and n.
    kd: usize,
    md: usize,
    nd: usize,
    /// Strides along k in a and b, along m in a and out, along n in b and out.
    ka: usize,
    kb: usize,
    ma: usize,
    mo: usize,
    nb: usize,
    no: usize,
    /// Batch axes: (size, stride in a or 0 when broadcast, same in b, stride in out).
    batch: Vec<(usize, usize, usize, usize)>,
}

impl ProductAxes {
    fn out_shape(&self, a: &[usize], b: &[usize]) -> TractResult<Vec<usize>> {
        self.out_axes
            .iter()
            .map(|&(ia, ib)| match (ia.map(|i| a[i]), ib.map(|i| b[i])) {
                (Some(x), Some(y)) if x == y || y == 1 => Ok(x),
                (Some(1), Some(y)) => Ok(y),
                (Some(x), None) | (None, Some(x)) => Ok(x),
                (None, None) => Ok(1),
                (x, y) => bail!("matrix product: axes of sizes {x:?} and {y:?} do not broadcast"),
            })
            .collect()
    }

    /// The layout of a call with operands of shapes `sa` and `sb`.
    fn layout(&self, sa: &[usize], sb: &[usize]) -> TractResult<ProductLayout> {
        let kd = sa[self.k.0];
        ensure!(sb[self.k.1] == kd, "matrix product: contracted sizes {} and {}", kd, sb[self.k.1]);
        let shape = self.out_shape(sa, sb)?;
        let (st_a, st_b, st_o) = (strides(sa), strides(sb), strides(&shape));
        let n_b = self.out_axes[self.n_out].1.context("n axis")?;
        let (md, ma, mo) = match self.m_out {
            Some(o) => (shape[o], st_a[self.out_axes[o].0.context("m axis")?], st_o[o]),
            None => (1, 0, 0),
        };
        let batch = (0..shape.len())
            .filter(|&o| o != self.n_out && Some(o) != self.m_out)
            .map(|o| {
                let (ia, ib) = self.out_axes[o];
                let sa_ = ia.filter(|&i| sa[i] > 1).map_or(0, |i| st_a[i]);
                let sb_ = ib.filter(|&i| sb[i] > 1).map_or(0, |i| st_b[i]);
                (shape[o], sa_, sb_, st_o[o])
            })
            .collect();
        Ok(ProductLayout {
            kd,
            md,
            nd: shape[self.n_out],
            ka: st_a[self.k.0],
            kb: st_b[self.k.1],
            ma,
            mo,
            nb: st_b[n_b],
            no: st_o[self.n_out],
            batch,
            shape,
        })
    }

    /// `f(layout, a, b)` on the two f32 inputs of a call, as plain slices.
    fn with_operands<R>(&self, inputs: TVec<TValue>, f: impl FnOnce(ProductLayout, &[f32], &[f32]) -> TractResult<R>) -> TractResult<R> {
        let (a, b) = args_2!(inputs);
        let l = self.layout(a.shape(), b.shape())?;
        let (a, b) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        f(l, a.as_slice::<f32>()?, b.as_slice::<f32>()?)
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (a, b) = (inputs[0], inputs[1]);
        let shape: TVec<TDim> = self
            .out_axes
            .iter()
            .map(|&(ia, ib)| match (ia.map(|i| &a.shape[i]), ib.map(|i| &b.shape[i])) {
                (Some(x), Some(y)) if y.is_one() => x.clone(),
                (Some(x), Some(y)) if x.is_one() => y.clone(),
                (Some(x), _) => x.clone(),
                (None, Some(y)) => y.clone(),
                (None, None) => TDim::from(1),
            })
            .collect();
        Ok(tvec![f32::fact(shape)])
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let out = self.output_facts(inputs)?;
        let k = inputs[0].shape[self.k.0].clone();
        Ok(tvec![(Cost::FMA(f32::datum_type()), out[0].shape.volume() * k)])
    }
}

impl ProductLayout {
    /// The batches' offsets in a, b and out, in the output's order.
    fn batches(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let count: usize = self.batch.iter().map(|b| b.0).product();
        (0..count).map(move |flat| {
            let (mut oa, mut ob, mut oo, mut rest) = (0, 0, 0, flat);
            for &(size, s_a, s_b, s_o) in self.batch.iter().rev() {
                let i = rest % size;
                rest /= size;
                oa += i * s_a;
                ob += i * s_b;
                oo += i * s_o;
            }
            (oa, ob, oo)
        })
    }
}

impl EvalOp for FewRowMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.axes.with_operands(inputs, |l, a, b| self.products(l, a, b))
    }
}

impl FewRowMatMul {
    fn products(&self, l: ProductLayout, a: &[f32], b: &[f32]) -> TractResult<TVec<TValue>> {
        // A tensor of tract's own (an ndarray handed over would be copied).
        let mut out_tensor = Tensor::zero::<f32>(&l.shape)?;
        let mut out_view = out_tensor.try_as_plain_ram_mut()?;
        let out = out_view.as_slice_mut::<f32>()?;
        let (kd, nd) = (l.kd, l.nd);
        for (oa, ob, oo) in l.batches() {
            for mi in 0..l.md {
                let (oa, oo) = (oa + mi * l.ma, oo + mi * l.mo);
                if l.kb == 1 && l.ka == 1 {
                    // q·kᵀ: each output a dot product of two contiguous rows.
                    let q = &a[oa..oa + kd];
                    for ni in 0..nd {
                        let off = ob + ni * l.nb;
                        out[oo + ni * l.no] = dot(q, &b[off..off + kd]);
                    }
                } else if l.nb == 1 && l.no == 1 {
                    // p·v: the output row a sum of contiguous rows of b.
                    let row = &mut out[oo..oo + nd];
                    for ki in 0..kd {
                        let w = a[oa + ki * l.ka];
                        let off = ob + ki * l.kb;
                        row.iter_mut().zip(&b[off..off + nd]).for_each(|(o, &v)| *o += w * v);
                    }
                } else {
                    for ni in 0..nd {
                        out[oo + ni * l.no] = (0..kd).map(|ki| a[oa + ki * l.ka] * b[ob + ni * l.nb + ki * l.kb]).sum();
                    }
                }
            }
        }
        drop(out_view);
        Ok(tvec![out_tensor.into_tvalue()])
    }
}

/// `Σ x·y` in 8 partial sums (so the compiler vectorizes it; the order differs from a serial
/// sum by f32 rounding only).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (xs, ys) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] += xs[i] * ys[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl TypedOp for FewRowMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.axes.output_facts(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.axes.cost(inputs)
    }

    as_op!();
}
