//! tract's `MoveAxis` (from an ONNX `Transpose`) of an f32 tensor whose last axis stays last:
//! the encoder's 24 cross-attention keys and values, `[1, 197, 12, 64]` → `[1, 12, 197, 64]`.
//! tract zeroes its output, then copies into it, on one thread: 2.0 ms of the encoder at 1 and
//! at 2 threads (README "Performance"). Here each input row (the last axis, contiguous) is
//! copied once to where it goes, and with 2 threads the helper copies the second half of the
//! input's rows: about those its own half of the product before wrote (`int8::columns`; for
//! the keys/values, positions from 98.5 against the product's 96).

use std::mem::MaybeUninit;
use std::ops::Range;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::runtime::helper_thread::{self, Disjoint};
use crate::runtime::int8::{on_helper, written_tensor};

/// `y = x` with input axis `from` moved to position `to` (tract's `AxisOp::Move`), both before
/// the last axis; f32, any rank ≥ 2. The same values as tract's (a copy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoveAxisRows {
    from: usize,
    to: usize,
}

impl MoveAxisRows {
    /// For `AxisOp::Move(from, to)` on a tensor of rank `rank`; `None` where the last axis would
    /// move (or nothing would).
    pub fn new(from: usize, to: usize, rank: usize) -> Option<Self> {
        (rank >= 2 && from < rank - 1 && to < rank - 1 && from != to).then_some(MoveAxisRows { from, to })
    }

    /// `perm[i]`: the input axis that is output axis `i`.
    fn perm(&self, rank: usize) -> Vec<usize> {
        let mut axes: Vec<usize> = (0..rank).collect();
        let axis = axes.remove(self.from);
        axes.insert(self.to, axis);
        axes
    }
}

impl Op for MoveAxisRows {
    fn name(&self) -> StaticName {
        "MoveAxisRows".into()
    }
    op_as_typed_op!();
}

impl EvalOp for MoveAxisRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape().to_vec();
        let rank = shape.len();
        ensure!(rank >= 2 && self.from.max(self.to) < rank - 1, "MoveAxisRows: axes {} → {} of a tensor of shape {shape:?}", self.from, self.to);
        let perm = self.perm(rank);
        let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
        let (lead, d) = (&shape[..rank - 1], shape[rank - 1]);
        let rows: usize = lead.iter().product();
        // How far apart (in rows of `d`) the output puts consecutive indices of each input axis.
        let mut stride = vec![0usize; rank - 1];
        let mut s = 1;
        for i in (0..rank - 1).rev() {
            stride[perm[i]] = s;
            s *= out_shape[i];
        }
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        // Copies input rows `part` to their places in `y`.
        let copy = |part: Range<usize>, y: Disjoint<'_, MaybeUninit<f32>>| {
            let mut index = vec![0usize; rank - 1];
            let mut rest = part.start;
            for i in (0..rank - 1).rev() {
                index[i] = rest % lead[i];
                rest /= lead[i];
            }
            let mut at: usize = index.iter().zip(&stride).map(|(i, s)| i * s).sum();
            for r in part {
                // Safety: output row `at` is this input row's alone (the map is one-to-one), so
                // no other part writes it.
                let dst = unsafe { y.slice(at * d..(at + 1) * d) };
                // Safety: `d` f32 from a slice of `d` into one of `d`, distinct buffers.
                unsafe { std::ptr::copy_nonoverlapping(x[r * d..(r + 1) * d].as_ptr(), dst.as_mut_ptr().cast::<f32>(), d) };
                // The next input index, odometer-wise, and where it goes.
                for i in (0..rank - 1).rev() {
                    index[i] += 1;
                    at += stride[i];
                    if index[i] < lead[i] {
                        break;
                    }
                    at -= index[i] * stride[i];
                    index[i] = 0;
                }
            }
        };
        // Safety: the input rows cover the output rows one-to-one, each written whole.
        let y = unsafe {
            written_tensor::<f32>(&out_shape, |y| {
                let y = Disjoint::new(y);
                // Nothing to copy (and a leading axis of 0 has no index to start from).
                if d == 0 || rows == 0 {
                    return;
                }
                if on_helper(rows) {
                    let mid = rows.div_ceil(2);
                    helper_thread::join(|| copy(0..mid, y), || copy(mid..rows, y));
                } else {
                    copy(0..rows, y);
                }
            })?
        };
        Ok(tvec![y.into_tvalue()])
    }
}

impl TypedOp for MoveAxisRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        ensure!(self.from.max(self.to) + 1 < shape.len(), "MoveAxisRows: axes {} → {} of rank {}", self.from, self.to, shape.len());
        let axis = shape.remove(self.from);
        shape.insert(self.to, axis);
        Ok(tvec![f32::fact(shape)])
    }
    as_op!();
}
