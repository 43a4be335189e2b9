//! An [`Int8MatMul`]'s work on a range of rows: the product (rten-gemm's packed weights), the
//! right zero point's correction and the folded dequantization, so that the encoder's products
//! can run in parts (halves on [`helper_thread`] with 2 threads), each part doing all of its
//! rows' work — as our AVX2 tiles' `eval_tiles` (here too) does through
//! `GemvWeights::gemm_tiles_map`. (AMX tiles split by columns instead: `int8::columns`.)

use std::mem::MaybeUninit;
use std::ops::Range;

use rten_gemm::{GemmInputA, GemmInputB, GemmOptions, GemmUninitOptions, PackedBMatrix, QuantParams};
use rten_tensor::{Matrix, NdTensorView};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{executor, helper_thread, with_threads, Dequantize, GemvWeights, Int8MatMul, Weights};

/// `out[r, n] = Σ_k (a[r, k] − a0) · b[k, n]` for `a: [rows, K]` (u8) and many-row weights
/// (rten-gemm's packed blocks), every element of `out` (`[rows, N]`) written and returned as
/// initialized, on the current rayon pool's threads.
///
/// Errors: rten-gemm's (operand sizes), as a tract error.
pub(super) fn product<'o>(weights: &Weights, a: &[u8], k: usize, a0: u8, out: &'o mut [MaybeUninit<i32>]) -> TractResult<&'o mut [i32]> {
    match weights {
        Weights::Packed(packed) => packed_product(packed, a, k, a0, out),
        // AMX tiles go by columns (`int8::columns`), few-row weights by their own kernels.
        Weights::Amx(_) | Weights::Gemv(_) | Weights::Tiles(_) => bail!("Int8MatMul: row product on weights laid out for another kernel"),
    }
}

/// [`product`] on rten-gemm's packed blocks. A kernel whose u8×i8 pair sums saturate at i16
/// (x86-64 AVX2 without VNNI) is exact on 7-bit left operands: a = (a & 0x7F) + (a & 0x80),
/// each pair sum of either part within ±32,768 (|127·−128·2| = 32,512; |128·−128·2| = 32,768),
/// so Σ(a − a0)·b = Σ((a & 0x7F) − a0)·b + Σ(a & 0x80)·b, two exact products.
fn packed_product<'o>(packed: &PackedBMatrix<i8>, a: &[u8], k: usize, a0: u8, out: &'o mut [MaybeUninit<i32>]) -> TractResult<&'o mut [i32]> {
    let rows = a.len() / k;
    let a_zero = vec![a0; rows];
    let gemm = executor();
    let split: Option<(Vec<u8>, Vec<u8>)> = gemm.may_saturate().then(|| (a.iter().map(|&v| v & 0x7F).collect(), a.iter().map(|&v| v & 0x80).collect()));
    let first = split.as_ref().map_or(a, |(lo, _)| &lo[..]);
    let a_mat: Matrix<u8> = NdTensorView::from_data([rows, k], first);
    let opts = GemmUninitOptions { a_quant: Some(QuantParams { zero_point: &a_zero }), ..Default::default() };
    let out = gemm.gemm_uninit(out, GemmInputA::Unpacked(a_mat), GemmInputB::Packed(packed), opts).map_err(|e| format_err!("Int8MatMul: {e:?}"))?;
    if let Some((_, hi)) = &split {
        let hi_mat: Matrix<u8> = NdTensorView::from_data([rows, k], &hi[..]);
        let opts = GemmOptions { beta: 1, ..Default::default() };
        gemm.gemm(&mut *out, GemmInputA::Unpacked(hi_mat), GemmInputB::Packed(packed), opts).map_err(|e| format_err!("Int8MatMul: {e:?}"))?;
    }
    Ok(out)
}

/// `out[r, n] −= b0[n] · Σ_k (a[r, k] − a0)`: the right operand's zero points, which rten-gemm
/// ignores for pre-packed weights. Wrapping, like the i32 accumulation of the product itself.
pub(super) fn subtract_b_zero(out: &mut [i32], a: &[u8], k: usize, a0: u8, b_zero: &[i32]) {
    for (row, out_row) in a.chunks_exact(k).zip(out.chunks_exact_mut(b_zero.len())) {
        let centered = row.iter().fold(0i32, |s, &v| s.wrapping_add(v as i32)).wrapping_sub((k as i32).wrapping_mul(a0 as i32));
        out_row.iter_mut().zip(b_zero.iter()).for_each(|(o, &z)| *o = o.wrapping_sub(z.wrapping_mul(centered)));
    }
}

/// How [`Int8MatMul::eval_by_rows`] spreads the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parts {
    /// All on the calling thread.
    One,
    /// Two halves, one on [`helper_thread`]'s thread (2 threads: `int8::on_helper`).
    Halves,
    /// One part per thread of the node's rayon pool (3 or more threads).
    Pool,
}

/// Runs `part(rows, out rows)` over `out` (`rows` of `row_len`) as `parts` says; the first
/// error, if any.
fn run_parts<T: Send>(out: &mut [T], row_len: usize, parts: Parts, part: impl Fn(Range<usize>, &mut [T]) -> TractResult<()> + Sync) -> TractResult<()> {
    let rows = out.len() / row_len.max(1);
    match parts {
        Parts::One => part(0..rows, out),
        Parts::Halves => {
            let [first, second] = helper_thread::join_rows(out, row_len, part);
            first.and(second)
        }
        Parts::Pool => with_threads(rows, || {
            use rayon::prelude::*;
            let per = rows.div_ceil(rayon::current_num_threads()).max(1);
            out.par_chunks_mut(per * row_len).enumerate().try_for_each(|(i, o)| part(i * per..i * per + o.len() / row_len, o))
        }),
    }
}

impl Int8MatMul {
    /// The whole op on `m` rows in parts ([`Parts`]), each part doing all of its rows' work:
    /// shifting its rows of `a` to u8, the product, the correction for `b0` and the
    /// dequantization into its rows of the output. Same values as the one-thread rten-gemm path: each row's
    /// arithmetic is the same, in the same order, and rows are independent.
    pub(super) fn eval_by_rows(&self, inputs: &TVec<TValue>, m: usize, a0: u8, out_shape: &[usize], parts: Parts) -> TractResult<TValue> {
        let (k, n) = (self.k, self.n);
        let a = inputs[0].try_as_plain_ram()?;
        let (signed, unsigned) = if self.a_signed { (a.as_slice::<i8>()?, &[][..]) } else { (&[][..], a.as_slice::<u8>()?) };
        // Rows `r` of the left operand as u8 (an i8 v stands for the u8 v + 128, as `a0` does).
        let left = |r: &Range<usize>| -> std::borrow::Cow<'_, [u8]> {
            if self.a_signed {
                signed[r.start * k..r.end * k].iter().map(|&v| (v as u8) ^ 0x80).collect::<Vec<u8>>().into()
            } else {
                unsigned[r.start * k..r.end * k].into()
            }
        };
        // Rows `r`'s i32 sums into `acc` (all of it written), b0's correction taken off.
        let sums = |r: &Range<usize>, acc: &mut [MaybeUninit<i32>]| -> TractResult<()> {
            let a = left(r);
            let acc = product(&self.weights, &a, k, a0, acc)?;
            if let Some(b_zero) = &self.b_zero {
                subtract_b_zero(acc, &a, k, a0, b_zero);
            }
            Ok(())
        };
        let Some(dq) = &self.dequantize else {
            let product = |r: Range<usize>, out: &mut [MaybeUninit<i32>]| sums(&r, out);
            let mut result = Ok(());
            // Safety: every element is written by `product`; on an error, zeros (then dropped).
            let out = unsafe {
                written_tensor(out_shape, |out| {
                    result = run_parts(out, n, parts, product);
                    if result.is_err() {
                        out.fill(MaybeUninit::new(0));
                    }
                })?
            };
            result?;
            return Ok(out.into_tvalue());
        };
        let s = inputs.last().context("Int8MatMul: missing row scales")?;
        ensure!(s.len() == m, "Int8MatMul: row scales of shape {:?} for {m} rows", s.shape());
        let s = s.try_as_plain_ram()?;
        let s = s.as_slice::<f32>()?;
        let dequantized = |r: Range<usize>, y: &mut [MaybeUninit<f32>]| -> TractResult<()> {
            let mut acc = vec![MaybeUninit::uninit(); r.len() * n];
            sums(&r, &mut acc)?;
            // Safety: `sums` wrote every element of `acc`.
            let acc = unsafe { std::slice::from_raw_parts(acc.as_ptr().cast::<i32>(), acc.len()) };
            dequantize_rows(acc, &s[r.start..], dq, y);
            Ok(())
        };
        let mut result = Ok(());
        // Safety: each part writes all of its rows of `y`; on an error, `y` is filled with
        // zeros and then dropped unread.
        let y = unsafe {
            written_tensor(out_shape, |y| {
                result = run_parts(y, n, parts, dequantized);
                if result.is_err() {
                    y.fill(MaybeUninit::new(0.0));
                }
            })?
        };
        result?;
        Ok(dq.activate_tensor(y)?.into_tvalue())
    }
}

impl Int8MatMul {
    /// The product on [`GemvWeights::gemm_tiles_map`] (weights without zero points): each
    /// thread packs its own rows (from i8 directly, no shifted copy on one thread) and
    /// dequantizes its own rows of the result, so nothing but the product's bookkeeping runs on
    /// one thread. Same values as the other path: `a − a0` is the same integer either way.
    pub(super) fn eval_tiles(&self, w: &GemvWeights, inputs: &TVec<TValue>, m: usize, a0: u8, out_shape: &[usize]) -> TractResult<TValue> {
        let k = self.k;
        let a = inputs[0].try_as_plain_ram()?;
        let (signed, unsigned) = if self.a_signed { (a.as_slice::<i8>()?, &[][..]) } else { (&[][..], a.as_slice::<u8>()?) };
        // An i8 value v stands for the u8 v + 128 of the other paths (zero point `a0` likewise).
        let row = |r: usize, dst: &mut [u8]| {
            if self.a_signed {
                dst.iter_mut().zip(&signed[r * k..(r + 1) * k]).for_each(|(d, &v)| *d = (v as u8) ^ 0x80);
            } else {
                dst.copy_from_slice(&unsigned[r * k..(r + 1) * k]);
            }
        };
        let Some(dq) = &self.dequantize else {
            // Safety: `gemm_tiles_map` hands every row of `out` to one `finish`, which writes it.
            let out = unsafe { written_tensor(out_shape, |out| with_threads(m, || w.gemm_tiles_map(m, a0, row, out, |_, acc, out| out.iter_mut().zip(acc).for_each(|(o, &v)| _ = o.write(v)))))? };
            return Ok(out.into_tvalue());
        };
        let s = inputs.last().context("Int8MatMul: missing row scales")?;
        ensure!(s.len() == m, "Int8MatMul: row scales of shape {:?} for {m} rows", s.shape());
        let s = s.try_as_plain_ram()?;
        let s = s.as_slice::<f32>()?;
        // Safety: `gemm_tiles_map` hands every row of `y` to one `finish`, and `dequantize_rows`
        // writes all of it.
        let y = unsafe { written_tensor(out_shape, |y| with_threads(m, || w.gemm_tiles_map(m, a0, row, y, |r0, acc, y| dequantize_rows(acc, &s[r0..], dq, y))))? };
        Ok(dq.activate_tensor(y)?.into_tvalue())
    }
}

/// A `shape` tensor whose elements `fill` writes: our ops' outputs go straight into tract's
/// own buffer, not zeroed first (the encoder's are 80 MB per image) and not copied after (an
/// `ArrayD` handed to tract is copied whole, `Tensor::from_datum`: 4 % of a 2-thread profile's
/// samples, `perf`).
///
/// # Safety
/// `fill` must write every element of the slice it is handed.
pub(crate) unsafe fn written_tensor<T: Datum + Copy>(shape: &[usize], fill: impl FnOnce(&mut [MaybeUninit<T>])) -> TractResult<Tensor> {
    // Safety: the elements are written by `fill` (the caller's promise) before anyone reads
    // them; T is Copy, so an unwinding `fill` leaves nothing to drop.
    let mut t = unsafe { Tensor::uninitialized::<T>(shape)? };
    let len = t.len();
    if len == 0 {
        fill(&mut []);
    } else {
        let ptr = t.as_ptr_mut::<T>()?.cast::<MaybeUninit<T>>();
        fill(unsafe { std::slice::from_raw_parts_mut(ptr, len) });
    }
    Ok(t)
}

/// `y[r, c] = (acc[r, c] as f32 · s[r]) · ws[c] (+ bias[c])` for `acc, y: [rows, N]`: the
/// graph's order and roundings ([`Dequantize`]). Writes every element of `y`.
pub(super) fn dequantize_rows(acc: &[i32], s: &[f32], dq: &Dequantize, y: &mut [MaybeUninit<f32>]) {
    let n = dq.scales.len();
    for ((y_row, acc_row), &sr) in y.chunks_exact_mut(n).zip(acc.chunks_exact(n)).zip(s) {
        dq.row(acc_row, sr, 0..n, y_row);
    }
}
