//! The activations' dynamic quantization as one op (issue #15).
//!
//! Our fast layout quantizes each activation row before its int8 products (`export::fast`'s
//! `matmul_int8`): `scale = max(max|x|, tiny) · (1/127)`, `q = Cast<i8>((x · (1/scale) + M) − M)`
//! with `M = 1.5·2²³` (round half to even). In tract that is nine ops per quantized tensor
//! (`Abs`, `Reduce<Max>`, `Max`, `Mul`, `Recip`, `Mul`, `Add`, `Sub`, `Cast`), ~650 small ops
//! per decoder step and ~25 ms of the encoder, each reading and writing the whole tensor.
//! [`substitute`] replaces each such chain by one [`QuantizeRows`], which reads a row twice
//! (its maximum, then the quantization) with the same operations in the same order, so the same
//! bits: the chain's own constants are taken from the graph, not assumed.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::math::{Abs, Add, Max, Mul, Recip, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// The rounding constant of the exporter's chain, 1.5·2²³ (`export::fast`'s `q.round_magic`).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Rows of at least this many elements in all are quantized on rayon's current pool.
const PARALLEL_MIN_LEN: usize = 1 << 16;

/// `x [.., K]` f32 → `q [.., K]` i8 and `scale [.., 1]` f32, per row:
/// `scale = max(max_k |x|, tiny) · inv_max`, `q = Cast<i8>((x · (1/scale) + magic) − magic)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeRows {
    tiny: f32,
    inv_max: f32,
    magic: f32,
}

impl Eq for QuantizeRows {}

impl QuantizeRows {
    /// One row: its scale, and `q` written.
    fn row(&self, x: &[f32], q: &mut [i8]) -> f32 {
        // Eight lanes so that the maximum vectorizes; max is exact in any order.
        let mut lanes = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v.abs());
            }
        }
        let amax = chunks.remainder().iter().fold(lanes.iter().fold(0f32, |m, &v| m.max(v)), |m, &v| m.max(v.abs()));
        let scale = amax.max(self.tiny) * self.inv_max;
        let inv = scale.recip();
        // The shortcut needs |x·inv| ≤ 127 (so inv_max ≥ 1/127) and a finite inv (a normal
        // smallest scale): the exporter's chain has both; any other takes the cast.
        if self.magic == ROUND_MAGIC && self.inv_max >= 1.0 / 127.0 && (self.tiny * self.inv_max).is_normal() {
            // x·inv + 1.5·2²³ lies in [2²³, 2²⁴) for |x·inv| < 2²², where the float's ulp is 1:
            // its mantissa is 2²² + round_half_even(x·inv), so the low byte is the rounded value
            // itself (|·| ≤ 127 here, as the scale is the row's maximum) — what `(r − M) as i8`
            // gives, without the saturating cast, which did not vectorize: 0.8 → 0.13 ms for
            // 197 × 3072 values (AMD EPYC, Zen 3). A NaN (from a NaN or infinite input) gives 0
            // for the canonical NaN, like the cast, and its payload's low byte otherwise.
            for (q, &v) in q.iter_mut().zip(x) {
                *q = (v * inv + self.magic).to_bits() as i8;
            }
        } else {
            for (q, &v) in q.iter_mut().zip(x) {
                *q = ((v * inv + self.magic) - self.magic) as i8;
            }
        }
        scale
    }
}

impl Op for QuantizeRows {
    fn name(&self) -> StaticName {
        "QuantizeRows".into()
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizeRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape().to_vec();
        let k = *shape.last().context("QuantizeRows: a scalar input")?;
        ensure!(k > 0, "QuantizeRows: empty rows");
        let x_ram = x.try_as_plain_ram()?;
        let x = x_ram.as_slice::<f32>()?;
        let rows = x.len() / k;
        // q in a tensor of tract's own (an ndarray handed over would be copied whole).
        let mut q_tensor = Tensor::zero::<i8>(&shape)?;
        let mut q_view = q_tensor.try_as_plain_ram_mut()?;
        let q = q_view.as_slice_mut::<i8>()?;
        let mut scales = vec![0f32; rows];
        // Never through rayon on one thread: its pool would run the rows on another core, far
        // from the caches holding x (measured: the encoder's 50 quantizations 19.6 ms, 13.0 ms
        // in place).
        if x.len() >= PARALLEL_MIN_LEN && super::int8::on_helper(rows) {
            // 2 threads: half the rows on the helper thread (see `int8::on_helper`).
            let halves = super::helper_thread::join_rows(q, k, |r, q| q.chunks_mut(k).zip(x[r.start * k..r.end * k].chunks(k)).map(|(q, x)| self.row(x, q)).collect::<Vec<f32>>());
            scales = halves.concat();
        } else if x.len() >= PARALLEL_MIN_LEN && super::int8::threads() > 1 {
            use rayon::prelude::*;
            // On the node's threads (`--threads`), as the int8 products.
            super::int8::with_threads(rows, || q.par_chunks_mut(k).zip(x.par_chunks(k)).zip(scales.par_iter_mut()).for_each(|((q, x), s)| *s = self.row(x, q)));
        } else {
            q.chunks_mut(k).zip(x.chunks(k)).zip(scales.iter_mut()).for_each(|((q, x), s)| *s = self.row(x, q));
        }
        let mut scale_shape = shape.clone();
        *scale_shape.last_mut().context("QuantizeRows: a scalar input")? = 1;
        drop(q_view);
        Ok(tvec![
            q_tensor.into_tvalue(),
            tract_ndarray::ArrayD::from_shape_vec(&*scale_shape, scales)?.into_tvalue()
        ])
    }
}

impl TypedOp for QuantizeRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type() && x.rank() >= 1, "QuantizeRows: input {x:?}");
        let mut scale: TVec<TDim> = x.shape.to_tvec();
        scale[x.rank() - 1] = 1.into();
        Ok(tvec![i8::datum_type().fact(x.shape.clone()), f32::datum_type().fact(scale)])
    }

    as_op!();
}

/// Replaces every quantization chain of a decluttered model (see the module docs) by a
/// [`QuantizeRows`]; returns how many. Chains that differ in any op, order, constant form or
/// shape stay tract's.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let Some((x, scale, op)) = chain_ending_at(model, id) else { continue };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::new(format!("{name}: quantization as one op"));
        let wire = patch.tap_model(model, x)?;
        let outs = patch.wire_node(&name, op, &[wire])?;
        patch.shunt_outside(model, OutletId::new(id, 0), outs[0])?;
        patch.shunt_outside(model, scale, outs[1])?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// The value of a uniform f32 constant.
pub(crate) fn uniform_f32(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let t = model.outlet_fact(outlet).ok()?.konst.clone()?;
    if t.datum_type() != f32::datum_type() || t.len() == 0 || !t.is_uniform() {
        return None;
    }
    t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.first().copied()
}

/// The node behind `outlet` if its op is a binary `M` (f32): its two inputs.
pub(crate) fn binary<M: BinMiniOp>(model: &TypedModel, outlet: OutletId) -> Option<(usize, OutletId, OutletId)> {
    let node = model.node(outlet.node);
    let bin = node.op_as::<TypedBinOp>()?;
    (bin.0.is::<M>() && node.inputs.len() == 2 && model.outlet_fact(outlet).ok()?.datum_type == f32::datum_type()).then(|| (node.id, node.inputs[0], node.inputs[1]))
}

/// Of a commutative op's two inputs, the one that is a uniform constant (its value) and the other.
fn with_constant(model: &TypedModel, a: OutletId, b: OutletId) -> Option<(OutletId, f32)> {
    match (uniform_f32(model, a), uniform_f32(model, b)) {
        (None, Some(c)) => Some((a, c)),
        (Some(c), None) => Some((b, c)),
        _ => None,
    }
}

/// The node behind `outlet` if it is the element-wise `M`: its input.
fn unary<M: ElementWiseMiniOp>(model: &TypedModel, outlet: OutletId) -> Option<OutletId> {
    let node = model.node(outlet.node);
    (node.op_as::<ElementWiseOp>()?.0.is::<M>() && node.inputs.len() == 1).then(|| node.inputs[0])
}

/// For a `Cast` to i8 at node `id`, the quantization chain before it: `(x, scale outlet, op)`.
fn chain_ending_at(model: &TypedModel, id: usize) -> Option<(OutletId, OutletId, QuantizeRows)> {
    let cast = model.node(id);
    if cast.op_as::<Cast>()?.to != i8::datum_type() || cast.inputs.len() != 1 {
        return None;
    }
    // (r + M) − M: the constant subtracted, not the other way round.
    let (_, rounded, m_sub) = binary::<Sub>(model, cast.inputs[0])?;
    let magic = uniform_f32(model, m_sub)?;
    let (_, a, b) = binary::<Add>(model, rounded)?;
    let (scaled, magic_add) = with_constant(model, a, b)?;
    // x · (1/scale)
    let (_, a, b) = binary::<Mul>(model, scaled)?;
    let ((x, scale), by_inverse) = match (unary::<Recip>(model, a), unary::<Recip>(model, b)) {
        (None, Some(s)) => ((a, s), true),
        (Some(s), None) => ((b, s), true),
        _ => ((a, a), false),
    };
    // scale = max(max|x|, tiny) · inv_max, max|x| over the last axis of this same x.
    let (_, a, b) = binary::<Mul>(model, scale)?;
    let (clamped, inv_max) = with_constant(model, a, b)?;
    let (_, a, b) = binary::<Max>(model, clamped)?;
    let (reduced, tiny) = with_constant(model, a, b)?;
    let reduce_node = model.node(reduced.node);
    let reduce = reduce_node.op_as::<Reduce>()?;
    let x_fact = model.outlet_fact(x).ok()?;
    let rank = x_fact.rank();
    let abs_of = unary::<Abs>(model, *reduce_node.inputs.first()?)?;
    let ok = by_inverse
        && magic == magic_add
        && abs_of == x
        && reduce.reducer == Reducer::Max
        && model.outlet_fact(scale).ok()?.shape.last() == Some(&TDim::from(1))
        && rank >= 1
        && reduce.axes.as_slice() == [rank - 1]
        && x_fact.datum_type == f32::datum_type()
        && model.outlet_fact(scale).ok()?.shape.iter().take(rank - 1).eq(x_fact.shape.iter().take(rank - 1))
        && model.outlet_fact(scale).ok()?.rank() == rank;
    ok.then_some((x, scale, QuantizeRows { tiny, inv_max, magic }))
}
