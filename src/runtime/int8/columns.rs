//! An [`Int8MatMul`] on AMX tiles ([`AmxWeights`]) in blocks of rows and columns. With 2
//! threads the helper takes the rows from the multiple of 16 nearest below half (197: 96 + 101),
//! all columns: each thread then reads all the weights, but its rows of the left operand are
//! those its own half of the quantization wrote, and the rows of the output are those its own
//! half of the next row-wise op (layer norm, quantization) reads, so that little data crosses
//! between the cores. Half the columns each (half the weights each, every row crossing) was
//! 8 % slower on the 2-thread encoder (README "Performance"; a C copy of the loop, with a
//! quantization before and a row-wise read after: 122–128 µs per 768 × 768 product in column
//! halves, 106–108 µs in row halves, 186–188 µs on one core). With rayon's pool (3 threads or
//! more) the parts are column ranges. A part does all of its block's work: the product, the
//! zero points' corrections and the folded dequantization.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Mutex;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::rows::{written_tensor, Parts};
use super::{helper_thread, with_threads, Int8MatMul};
use crate::runtime::helper_thread::Disjoint;
use crate::runtime::amx::{AmxWeights, Left, COLUMN_STEP, TILE_ROWS};
use crate::runtime::f32_ops::GeluExactF32;

/// Row `r`'s columns `cols` of the `[rows, n]` matrix `m`.
///
/// # Safety
/// As [`Disjoint::slice`]: no other part uses these elements meanwhile.
unsafe fn row<'a, T>(m: Disjoint<'a, T>, n: usize, r: usize, cols: &Range<usize>) -> &'a mut [T] {
    unsafe { m.slice(r * n + cols.start..r * n + cols.end) }
}

/// Runs `part(rows, columns)` over the `[m, n]` output as `parts` says: for
/// [`Parts::Halves`] two row ranges split at a multiple of [`TILE_ROWS`] (no partial tile in
/// the first), or two column ranges where there are fewer than 31 rows; for
/// [`Parts::Pool`] column ranges of whole [`COLUMN_STEP`]s. The first error, if any.
fn run_blocks(n: usize, m: usize, parts: Parts, part: impl Fn(Range<usize>, Range<usize>) -> TractResult<()> + Sync) -> TractResult<()> {
    let steps = n / COLUMN_STEP;
    match parts {
        Parts::One => part(0..m, 0..n),
        Parts::Halves => {
            let ((rows_a, cols_a), (rows_b, cols_b)) = if m.div_ceil(2) >= TILE_ROWS {
                let mid = m.div_ceil(2) / TILE_ROWS * TILE_ROWS;
                ((0..mid, 0..n), (mid..m, 0..n))
            } else {
                let mid = steps.div_ceil(2) * COLUMN_STEP;
                ((0..m, 0..mid), (0..m, mid..n))
            };
            let (mut first, second) = (Ok(()), Mutex::new(Ok(())));
            helper_thread::join(|| first = part(rows_a, cols_a), || *second.lock().unwrap_or_else(|e| e.into_inner()) = part(rows_b.clone(), cols_b.clone()));
            first.and(second.into_inner().unwrap_or_else(|e| e.into_inner()))
        }
        Parts::Pool => with_threads(m, || {
            use rayon::prelude::*;
            let per = steps.div_ceil(rayon::current_num_threads()).max(1) * COLUMN_STEP;
            (0..n.div_ceil(per)).into_par_iter().try_for_each(|i| part(0..m, i * per..((i + 1) * per).min(n)))
        }),
    }
}

impl Int8MatMul {
    /// The whole op on AMX tiles, `m` rows, in blocks as [`run_blocks`] cuts them. Same values as
    /// the other paths: each element's integer sum is exact, and its corrections and
    /// dequantization are the same operations in the same order.
    pub(super) fn eval_columns(&self, w: &AmxWeights, inputs: &TVec<TValue>, m: usize, a0: u8, out_shape: &[usize], parts: Parts) -> TractResult<TValue> {
        let (k, n) = (self.k, self.n);
        ensure!(w.n() == n && n % COLUMN_STEP == 0, "Int8MatMul: AMX weights of {} columns for {n}", w.n());
        let a = inputs[0].try_as_plain_ram()?;
        // `a0` comes in u8 terms (an i8 value v standing for v + 128); AMX takes i8 as it is.
        let (left, a0) = if self.a_signed { (Left::I8(a.as_slice::<i8>()?), a0 as i32 - 128) } else { (Left::U8(a.as_slice::<u8>()?), a0 as i32) };
        ensure!(a.len() == m * k, "Int8MatMul: {} left values for {m} rows of {k}", a.len());
        // Σ_k (a − a0) per row, for the right operand's zero points: `− b0[n] · Σ_k (a − a0)`.
        let centered: Option<Vec<i32>> = self.b_zero.as_ref().map(|_| left.row_sums(k).into_iter().map(|s| s.wrapping_sub((k as i32).wrapping_mul(a0))).collect());
        // A part's i32 sums, written into its block (rows × columns) of the `[m, N]` matrix at
        // `acc` (an i32 output, or the f32 output that they are then turned into in place), b0's
        // correction taken off.
        let sums = |acc: *mut i32, rows: &Range<usize>, cols: &Range<usize>| {
            // Safety: `acc` holds `[m, N]` 4-byte elements; this part alone uses its block.
            unsafe { w.gemm_columns(left.rows(rows.clone(), k), a0, cols.clone(), acc.add(rows.start * n)) };
            if let (Some(b_zero), Some(centered)) = (&self.b_zero, &centered) {
                for (r, &c) in centered.iter().enumerate().take(rows.end).skip(rows.start) {
                    // Safety: as above; every element of the block's row was written just now.
                    let row = unsafe { std::slice::from_raw_parts_mut(acc.add(r * n + cols.start), cols.len()) };
                    row.iter_mut().zip(&b_zero[cols.clone()]).for_each(|(o, &z)| *o = o.wrapping_sub(z.wrapping_mul(c)));
                }
            }
        };
        let Some(dq) = &self.dequantize else {
            // Safety: every element is written by `sums` (each in one part's block).
            let out = unsafe {
                written_tensor(out_shape, |out: &mut [MaybeUninit<i32>]| {
                    let out = Disjoint::new(out);
                    // `sums` cannot fail; nor can `run_blocks` then.
                    let _ = run_blocks(n, m, parts, |rows, cols| {
                        sums(out.as_mut_ptr().cast::<i32>(), &rows, &cols);
                        Ok(())
                    });
                })?
            };
            return Ok(out.into_tvalue());
        };
        let s = inputs.last().context("Int8MatMul: missing row scales")?;
        ensure!(s.len() == m, "Int8MatMul: row scales of shape {:?} for {m} rows", s.shape());
        let s = s.try_as_plain_ram()?;
        let s = s.as_slice::<f32>()?;
        // The sums go where their f32 values will be (i32 and f32: same size and alignment) and
        // are replaced in place, while a part's block is still in its L2: no second `[m, N]`
        // buffer (FC1's sums and output were 2 × 2.4 MB, more than a 2 MiB L2).
        // Safety: each element belongs to one part's block, which writes it.
        // A folded GELU runs on each row's columns right after them, still in L1.
        let mut done = Ok(());
        let y = unsafe {
            written_tensor(out_shape, |y| {
                let y = Disjoint::new(y);
                done = run_blocks(n, m, parts, |rows, cols| {
                    sums(y.as_mut_ptr().cast::<i32>(), &rows, &cols);
                    let mut gelu = if dq.gelu { Some(GeluExactF32::new()?) } else { None };
                    for (r, &sr) in s.iter().enumerate().take(rows.end).skip(rows.start) {
                        // Safety: this part's columns of its row r, holding their sums.
                        let values = row(y, n, r, &cols);
                        dq.row_in_place(values, sr, cols.clone());
                        if let Some(gelu) = &mut gelu {
                            // Safety: all written just now.
                            gelu.run(std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<f32>(), values.len()))?;
                        }
                    }
                    Ok(())
                });
                if done.is_err() {
                    // Safety: the elements are plain data; zeros before the tensor is dropped.
                    std::ptr::write_bytes(y.as_mut_ptr(), 0, m * n);
                }
            })?
        };
        done?;
        Ok(y.into_tvalue())
    }
}
