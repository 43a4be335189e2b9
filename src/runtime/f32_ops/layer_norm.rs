//! Layer normalization (ONNX `LayerNormalization`) as one op, with tract's arithmetic.
//!
//! tract expands `LayerNormalization` into a row sum (`Reduce<Sum>`), the mean (`/ K` or
//! `· (1/K)`), the centred row (`Sub`) and an `RmsNorm` of it (its declutter pass finds
//! `x · rsqrt(mean(x²) + ε)`), then the scale (`Mul`) and bias (`Add`) where they are not 1 and
//! 0. Each of those reads and writes the whole `[197, 768]` tensor on one thread (tract's
//! element-wise ops stay single-threaded at 2 threads, `runtime::set_threads`): 25 layer norms
//! took 3.6 ms of the 2-thread encoder (README "Performance"). [`LayerNormRows`] does a row's
//! five steps while it is in L1, with 2 threads half the rows on the helper thread. Its RMS
//! normalization is tract-linalg's own routine and its mean, scale and bias the graph's
//! operations, but the row sum runs in 16 lanes where tract's (`Reduce<Sum>`, the generic
//! kernel on x86-64) adds the 768 values one after the other, latency-bound (0.075 ms of the
//! 0.12 a layer norm took on one thread): the mean differs from tract's by f32 rounding
//! (`tests/f32_ops.rs` bounds both against the f64 definition).

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::math::{Add, Div, Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use crate::runtime::helper_thread::{self, Disjoint};
use crate::runtime::int8::{on_helper, written_tensor};
use crate::runtime::quantize::{binary, uniform_f32};

/// How the graph turns a row sum into the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mean {
    /// `sum / K` (the expansion's `Div` by the row length).
    Div(f32),
    /// `sum · c` (a `Div` by a constant that tract turned into a product).
    Mul(f32),
}

/// `y = ((x − mean) · rsqrt(mean((x − mean)²) + ε)) · γ + β` over the last axis of an f32
/// tensor (any leading shape; γ and β of the row's length, either absent when tract dropped it
/// as neutral): the steps of tract's expansion, but the row sum in 16 lanes (module docs).
/// Output: same shape.
///
/// With `residual`, the residual connection's sum before it too: inputs `a`, `b` (same shape),
/// outputs `x = a + b` (the next residual connection reads it) and `y` of that `x`; the add
/// took 0.7–1.3 ms of the encoder on its own, one thread.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormRows {
    mean: Mean,
    eps: f32,
    gamma: Option<Arc<[f32]>>,
    beta: Option<Arc<[f32]>>,
    residual: bool,
}

impl Eq for LayerNormRows {}

impl LayerNormRows {
    /// Rows `r` (of `k` values) normalized into `y` (those rows, every element written), a row
    /// at a time; with a residual sum, each row of `x = a + b` first (into `sum`, those rows).
    fn rows(&self, k: usize, r: Range<usize>, inputs: Rows<'_>, y: &mut [MaybeUninit<f32>]) -> TractResult<()> {
        let rms_norm = tract_linalg::routines::rms_norm_f32()?;
        for (i, y) in r.zip(y.chunks_exact_mut(k)) {
            let x: &[f32] = match inputs {
                Rows::One(x) => &x[i * k..(i + 1) * k],
                Rows::Sum(a, b, sum) => {
                    // Safety: row i is this part's alone (the rows it was handed).
                    let x = unsafe { sum.slice(i * k..(i + 1) * k) };
                    x.iter_mut().zip(&a[i * k..(i + 1) * k]).zip(&b[i * k..(i + 1) * k]).for_each(|((x, &a), &b)| _ = x.write(a + b));
                    // Safety: written just above.
                    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), k) }
                }
            };
            let s = row_sum(x);
            let mean = match self.mean {
                Mean::Div(len) => s / len,
                Mean::Mul(c) => s * c,
            };
            y.iter_mut().zip(x).for_each(|(y, &v)| _ = y.write(v - mean));
            // Safety: every element of the row was written just above.
            let y = unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), y.len()) };
            rms_norm(y, self.eps);
            if let Some(g) = &self.gamma {
                y.iter_mut().zip(g.iter()).for_each(|(y, &g)| *y *= g);
            }
            if let Some(b) = &self.beta {
                y.iter_mut().zip(b.iter()).for_each(|(y, &b)| *y += b);
            }
        }
        Ok(())
    }
}

/// Where [`LayerNormRows::rows`] reads its rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// The input `x`.
    One(&'a [f32]),
    /// `a + b`, written into the sum's output as it goes.
    Sum(&'a [f32], &'a [f32], Disjoint<'a, MaybeUninit<f32>>),
}

/// `Σ x` in 16 lanes (which vectorize), the lanes then added pairwise and the remainder after:
/// a different order from tract's one-after-the-other sum, and no less accurate (each lane
/// holds a sixteenth of the terms).
fn row_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
    }
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    chunks.remainder().iter().fold(lanes[0], |s, &v| s + v)
}

impl Op for LayerNormRows {
    fn name(&self) -> StaticName {
        "LayerNormRows".into()
    }
    op_as_typed_op!();
}

impl EvalOp for LayerNormRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1 + self.residual as usize, "LayerNormRows: {} inputs", inputs.len());
        let shape = inputs[0].shape();
        let k = *shape.last().context("LayerNormRows: a scalar input")?;
        ensure!(k > 0 && self.gamma.as_ref().is_none_or(|g| g.len() == k) && self.beta.as_ref().is_none_or(|b| b.len() == k), "LayerNormRows: rows of {k}");
        ensure!(inputs.iter().all(|t| t.shape() == shape), "LayerNormRows: inputs of shapes {:?}", inputs.iter().map(|t| t.shape()).collect::<Vec<_>>());
        let rams = inputs.iter().map(|t| t.try_as_plain_ram()).collect::<TractResult<Vec<_>>>()?;
        let xs = rams.iter().map(|r| r.as_slice::<f32>()).collect::<TractResult<Vec<_>>>()?;
        let rows = xs[0].len() / k;
        // The rows of `y` (and of the sum) in halves on the helper with 2 threads (see
        // `int8::on_helper`), else here.
        let normalize = |source: Rows<'_>, ys: &mut [MaybeUninit<f32>]| -> TractResult<()> {
            if on_helper(rows) {
                let [a, b] = helper_thread::join_rows(ys, k, |r, y| self.rows(k, r, source, y));
                a.and(b)
            } else {
                self.rows(k, 0..rows, source, ys)
            }
        };
        let mut done = Ok(());
        let mut sum = None;
        // Safety: `rows` writes every element of its rows of `y` and of the sum; on an error,
        // zeros.
        let y = unsafe {
            written_tensor(shape, |ys| {
                done = if self.residual {
                    let mut done_sum = Ok(());
                    let made = written_tensor(shape, |s| {
                        done_sum = normalize(Rows::Sum(xs[0], xs[1], Disjoint::new(s)), ys);
                        if done_sum.is_err() {
                            s.fill(MaybeUninit::new(0.0));
                        }
                    });
                    // The sum's tensor not made: nothing was written (the error comes back).
                    let done = match &made {
                        Ok(_) => done_sum,
                        Err(e) => Err(format_err!("LayerNormRows: the residual sum's output: {e}")),
                    };
                    sum = Some(made);
                    done
                } else {
                    normalize(Rows::One(xs[0]), ys)
                };
                if done.is_err() {
                    ys.fill(MaybeUninit::new(0.0));
                }
            })?
        };
        done?;
        Ok(match sum {
            Some(sum) => tvec![sum?.into_tvalue(), y.into_tvalue()],
            None => tvec![y.into_tvalue()],
        })
    }
}

impl TypedOp for LayerNormRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type() && x.rank() >= 1, "LayerNormRows: input {x:?}");
        ensure!(inputs.len() == 1 + self.residual as usize && inputs.iter().all(|i| i.datum_type == x.datum_type && i.shape == x.shape), "LayerNormRows: inputs {inputs:?}");
        let fact = f32::datum_type().fact(x.shape.clone());
        Ok(if self.residual { tvec![fact.clone(), fact] } else { tvec![fact] })
    }

    as_op!();
}

/// Replaces every layer normalization of a decluttered model (the chain in the module docs)
/// by a [`LayerNormRows`]; returns how many. Chains that differ in any op, operand order,
/// constant or consumer stay tract's.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let Some((x, last, mut op)) = chain_at(model, id) else { continue };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::new(format!("{name}: layer norm as one op"));
        // The residual connection's sum folded in where `x` is one (two computed operands).
        let sum = residual_sum(model, x);
        op.residual = sum.is_some();
        let sources = sum.map_or(vec![x], |(a, b)| vec![a, b]);
        let wires = sources.iter().map(|&o| patch.tap_model(model, o)).collect::<TractResult<Vec<_>>>()?;
        let out = patch.wire_node(format!("{name}.rows"), op, &wires)?;
        if sum.is_some() {
            patch.shunt_outside(model, x, out[0])?;
        }
        patch.shunt_outside(model, last, out[out.len() - 1])?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// `(a, b)` if `x` is `a + b` of two computed (not constant) f32 tensors of `x`'s shape.
fn residual_sum(model: &TypedModel, x: OutletId) -> Option<(OutletId, OutletId)> {
    let (_, a, b) = binary::<Add>(model, x)?;
    let x_fact = model.outlet_fact(x).ok()?;
    let computed = |o: OutletId| model.outlet_fact(o).ok().is_some_and(|f| f.konst.is_none() && f.shape == x_fact.shape && f.datum_type == f32::datum_type());
    (computed(a) && computed(b)).then_some((a, b))
}

/// The node's only consumer, if it has exactly one (and one output, not a graph output: a value
/// the graph returns is not an intermediate to fold away).
fn only_successor(model: &TypedModel, id: usize) -> Option<usize> {
    let node = model.node(id);
    let returned = model.output_outlets().ok()?.contains(&OutletId::new(id, 0));
    (node.outputs.len() == 1 && node.outputs[0].successors.len() == 1 && !returned).then(|| node.outputs[0].successors[0].node)
}

/// A constant of `k` f32 along the last axis (shape `[k]` or `[1, …, 1, k]`).
fn row_constant(model: &TypedModel, outlet: OutletId, k: usize) -> Option<Arc<[f32]>> {
    let t = model.outlet_fact(outlet).ok()?.konst.clone()?;
    let shape = t.shape();
    let ok = t.datum_type() == f32::datum_type() && shape.last() == Some(&k) && shape.iter().rev().skip(1).all(|&d| d == 1);
    ok.then(|| t.try_as_plain_ram().ok()?.as_slice::<f32>().ok().map(Arc::from))?
}

/// For an `RmsNorm` node `id`: `(x, the chain's last outlet, op)` if the chain around it is a
/// layer normalization of `x`.
fn chain_at(model: &TypedModel, id: usize) -> Option<(OutletId, OutletId, LayerNormRows)> {
    let node = model.node(id);
    let rms = node.op_as::<RmsNorm>()?;
    let d_fact = model.outlet_fact(*node.inputs.first()?).ok()?;
    let rank = d_fact.rank();
    let k = d_fact.shape.last()?.to_usize().ok()?;
    if rank == 0 || rms.axis != rank - 1 || d_fact.datum_type != f32::datum_type() || rms.eps.len() != 1 {
        return None;
    }
    let eps = rms.eps.cast_to_scalar::<f32>().ok()?;
    // d = x − mean, consumed only here.
    let (d_id, x, mean_outlet) = binary::<Sub>(model, node.inputs[0])?;
    // mean = sum / K or sum · c, consumed only by d.
    let mean_node = model.node(mean_outlet.node);
    let (sum_outlet, mean) = if let Some((_, s, c)) = binary::<Div>(model, mean_outlet) {
        (s, Mean::Div(uniform_f32(model, c)?))
    } else {
        let (_, a, b) = binary::<Mul>(model, mean_outlet)?;
        match (uniform_f32(model, a), uniform_f32(model, b)) {
            (None, Some(c)) => (a, Mean::Mul(c)),
            (Some(c), None) => (b, Mean::Mul(c)),
            _ => return None,
        }
    };
    // sum = Reduce<Sum>(x) over the last axis, consumed only by the mean.
    let sum_node = model.node(sum_outlet.node);
    let reduce = sum_node.op_as::<Reduce>()?;
    let chain_ok = reduce.reducer == Reducer::Sum
        && reduce.axes.as_slice() == [rank - 1]
        && sum_node.inputs.first() == Some(&x)
        && only_successor(model, sum_node.id) == Some(mean_node.id)
        && only_successor(model, mean_node.id) == Some(d_id)
        && only_successor(model, d_id) == Some(id)
        && model.outlet_fact(x).ok()?.shape == d_fact.shape;
    if !chain_ok {
        return None;
    }
    let mut op = LayerNormRows { mean, eps, gamma: None, beta: None, residual: false };
    let mut last = OutletId::new(id, 0);
    // Then · γ and + β where present (a constant row, the chain's value the other operand).
    let with_row = |model: &TypedModel, outlet: OutletId, a: OutletId, b: OutletId| -> Option<Arc<[f32]>> {
        if a == outlet {
            row_constant(model, b, k)
        } else if b == outlet {
            row_constant(model, a, k)
        } else {
            None
        }
    };
    if let Some(next) = only_successor(model, last.node) {
        if let Some((g_id, a, b)) = binary::<Mul>(model, OutletId::new(next, 0)) {
            if let Some(g) = with_row(model, last, a, b) {
                op.gamma = Some(g);
                last = OutletId::new(g_id, 0);
            }
        }
    }
    if let Some(next) = only_successor(model, last.node) {
        if let Some((b_id, a, b)) = binary::<Add>(model, OutletId::new(next, 0)) {
            if let Some(beta) = with_row(model, last, a, b) {
                op.beta = Some(beta);
                last = OutletId::new(b_id, 0);
            }
        }
    }
    // The output keeps the input's shape (no broadcast by γ or β).
    (model.outlet_fact(last).ok()?.shape == d_fact.shape).then_some((x, last, op))
}
