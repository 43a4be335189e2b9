//! Products of many rows (an encoder's 197, beam search's 4 on AVX2) on AVX2 without VNNI,
//! where rten-gemm's kernel saturates and needs two passes: one exact pass in register tiles
//! over [`GemvWeights`]' layout (its groups, or for an encoder's matrices its 16-column panels),
//! on one of two kernels chosen per matrix at load.
//!
//! - **Narrow weights** ([`GemvWeights::narrow`]: every pair of k-values a `vpmaddubsw` sums has
//!   |b₁| + |b₂| ≤ 128, as 7-bit weights in [−64, 64] always do — onnxruntime's
//!   `quantize_dynamic(reduce_range=True)`, `vitgpt2-host export --reduce-range`): the rows as u8,
//!   `vpmaddubsw` (u8 × i8, pairs summed to i16: |255·128| = 32,640 < 2¹⁵, so it cannot
//!   saturate) then `vpmaddwd` by 1 to i32; 6 rows × 16 columns per tile, 3 instructions per 32
//!   products. ~87–91 GMAC/s on an AMD EPYC (Zen 3) in a stand-alone loop over an encoder-sized
//!   product, against the i16 kernel's ~60 in the same run.
//! - **Any int8 weights**: the rows as i16 `a − a0` (|·| ≤ 255) and the weights widened to i16 as
//!   they are read (`vpmovsxbw`), multiplied by `vpmaddwd` (Intel SDM, PMADDWD: pairs of i16
//!   products summed into i32, exact as |2·255·128| < 2³¹); 6 rows × 8 columns, 4 instructions
//!   per 32 products.
//!
//! Both give `Σ_k (a − a0)·b` in wrapping i32, like the definition.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{isa, GemvWeights, GROUP};

/// Rows per register tile: 6 rows × 2 vectors = 12 accumulators, + 2 weight vectors + 1
/// broadcast (+ the narrow kernel's vector of ones, which `vpmaddwd` may read from memory)
/// ≤ 16 ymm.
pub(super) const TILE_ROWS: usize = 6;
/// Steps of 4 k-values per block: 768 k-values, so a block of the packed rows (197 × 768 × 2
/// bytes = 296 KiB for ViT-B/16 as i16, half that as u8) stays in a 512 KiB L2.
const TILE_KG: usize = 192;

impl GemvWeights {
    /// As [`gemm`](Self::gemm), for many rows on AVX2 without VNNI, in one exact pass (see the
    /// module's text); rows split across rayon's current pool. Panics where
    /// [`available`](super::available) is false.
    pub fn gemm_tiles(&self, a: &[u8], m: usize, a0: u8, out: &mut [i32]) {
        assert!(a.len() == m * self.k && out.len() == m * self.n, "GemvWeights::gemm_tiles: operand sizes");
        let k = self.k;
        self.gemm_tiles_map(m, a0, |r, dst| dst.copy_from_slice(&a[r * k..(r + 1) * k]), out, |_, acc, out| out.copy_from_slice(acc));
    }

    /// [`gemm_tiles`](Self::gemm_tiles) with the work before and after the product on the
    /// threads too: `row(r, dst)` writes row `r`'s `K` u8 values (zero point `a0`) into `dst`,
    /// and `finish(r0, acc, out)` turns the i32 products of rows `r0..` (`acc`, `[rows, N]`) into
    /// that thread's rows of `out` (`[m, N]`). Each thread packs and finishes only its own rows:
    /// with both on the calling thread, 2 threads ran the encoder 1.42× faster than 1; with them
    /// here, 1.63× (medians of 6 interleaved `bench` runs, README).
    pub fn gemm_tiles_map<T: Send>(
        &self,
        m: usize,
        a0: u8,
        row: impl Fn(usize, &mut [u8]) + Sync,
        out: &mut [T],
        finish: impl Fn(usize, &[i32], &mut [T]) + Sync,
    ) {
        assert!(out.len() == m * self.n, "GemvWeights::gemm_tiles: output size");
        assert!(isa().is_some(), "GemvWeights::gemm_tiles on a CPU without AVX2");
        let threads = rayon::current_num_threads().max(1);
        // Rows split evenly (197 on 2 threads: 99 + 98, each with a partial last tile, rather
        // than whole tiles' 102 + 95), and only where each thread gets a full tile: a beam's
        // few rows stay on one thread, since each thread would read all the weights.
        let rows_per = m.div_ceil(threads).max(1);
        let run = |(t, out): (usize, &mut [T])| {
            let (r0, rows) = (t * rows_per, out.len() / self.n);
            let packed = self.pack_rows(rows, a0, |r, dst| row(r0 + r, dst));
            let mut acc = self.accumulator(a0, rows, 0..self.n);
            self.tiles(&packed, rows, &mut acc, self.n, 0..self.n.div_ceil(GROUP));
            finish(r0, &acc, out);
        };
        if threads > 1 && rows_per >= TILE_ROWS && m > rows_per {
            use rayon::prelude::*;
            out.par_chunks_mut(rows_per * self.n).enumerate().for_each(run);
        } else {
            run((0, out));
        }
    }

    /// The i32 accumulator for `rows` rows of the columns `cols` that [`tiles`](Self::tiles)
    /// adds to: zeros, or for narrow weights (whose kernel multiplies `a` itself, not `a − a0`)
    /// `−a0·Σ_k b` per column, since `Σ (a − a0)·b = Σ a·b − a0·Σ b` (wrapping, like the
    /// product). Written once here rather than zeroed, then corrected.
    pub(super) fn accumulator(&self, a0: u8, rows: usize, cols: std::ops::Range<usize>) -> Vec<i32> {
        if !self.narrow {
            return vec![0; rows * cols.len()];
        }
        let zero_term: Vec<i32> = self.col_sums[cols].iter().map(|&s| (a0 as i32).wrapping_mul(s).wrapping_neg()).collect();
        let mut acc = Vec::with_capacity(rows * zero_term.len());
        for _ in 0..rows {
            acc.extend_from_slice(&zero_term);
        }
        acc
    }

    /// `rows` rows (`row(r, dst)` writes row `r`'s `K` u8 values, zero point `a0`) as the
    /// kernel for this matrix takes them, zero-padded to ⌈K/4⌉·4 to meet the weights' padding:
    /// u8 as they are for narrow weights, else centered as i16 row by row (one row's u8 in a
    /// scratch that stays in L1).
    pub(super) fn pack_rows(&self, rows: usize, a0: u8, row: impl Fn(usize, &mut [u8])) -> PackedRows {
        let kp = self.kg * 4;
        if self.narrow {
            let mut a = vec![0u8; rows * kp];
            a.chunks_exact_mut(kp).enumerate().for_each(|(r, dst)| row(r, &mut dst[..self.k]));
            return PackedRows::Narrow(a);
        }
        let (mut scratch, mut centered) = (vec![0u8; self.k], vec![0i16; rows * kp]);
        for (r, dst) in centered.chunks_exact_mut(kp).enumerate() {
            row(r, &mut scratch);
            dst.iter_mut().zip(&scratch).for_each(|(d, &v)| *d = v as i16 - a0 as i16);
        }
        PackedRows::Centered(centered)
    }

    /// `out [rows, ..] += Σ_k (a − a0)·b` for the column groups `groups`, the rows from
    /// [`pack_rows`](Self::pack_rows); `out` holds those groups' columns of each row, `stride`
    /// apart, and must come from [`accumulator`](Self::accumulator) for the same `a0` and
    /// columns: for narrow weights it holds the zero point's part, which a zeroed `out` lacks.
    pub(super) fn tiles(&self, packed: &PackedRows, rows: usize, out: &mut [i32], stride: usize, groups: std::ops::Range<usize>) {
        if rows == 0 {
            return;
        }
        let width = self.n.min(groups.end * GROUP) - groups.start * GROUP;
        assert!(out.len() >= (rows - 1) * stride + width, "GemvWeights::tiles: output size");
        match packed {
            PackedRows::Narrow(a) => self.tile_pass::<u8>(a, rows, out, stride, groups),
            PackedRows::Centered(a) => self.tile_pass::<i16>(a, rows, out, stride, groups),
        }
    }

    /// `out += packed · b` over the kernel for `E` (u8: narrow weights; i16: centered rows).
    fn tile_pass<E: TileElement>(&self, packed: &[E], rows: usize, out: &mut [i32], stride: usize, groups: std::ops::Range<usize>) {
        let kp = self.kg * 4;
        assert!(packed.len() == rows * kp, "GemvWeights::tiles: packed rows");
        let col0 = groups.start * GROUP;
        let width_of_pass = E::COLUMNS;
        for g0 in (0..self.kg).step_by(TILE_KG) {
            let steps = TILE_KG.min(self.kg - g0);
            for j in groups.clone() {
                let cols = GROUP.min(self.n - j * GROUP);
                for e in 0..cols.div_ceil(width_of_pass) {
                    // The pass's columns' 4 k-values: 4·COLUMNS bytes of each step, 256 bytes
                    // (a group's) or 64 (a panel's) apart.
                    let (bytes, c0) = (4 * width_of_pass, j * GROUP + width_of_pass * e);
                    let (first, step) = if self.panels { ((c0 / 16 * self.kg + g0) * 64 + c0 % 16 * 4, 64) } else { ((j * self.kg + g0) * 4 * GROUP + c0 % GROUP * 4, 4 * GROUP) };
                    let w = &self.w[first..][..(steps - 1) * step + bytes];
                    // The next group's block, a line per step spread over this group's passes
                    // (alone, the first pass would wait on memory and the others on arithmetic;
                    // beam 4's LM head 4.8 → 3.6 ms, measured). Only for one tile of rows: with
                    // more, each pass runs long enough on cached weights, and the prefetches cost
                    // the encoder ~6 % (measured). Not in panels (laid out for many rows).
                    let lines = if rows <= TILE_ROWS && !self.panels { 4 * steps } else { 0 };
                    let next = Prefetch { base: self.w.as_ptr().wrapping_add(((j + 1) * self.kg + g0) * 4 * GROUP), first: e * steps, lines };
                    for r0 in (0..rows).step_by(TILE_ROWS) {
                        let n_rows = TILE_ROWS.min(rows - r0);
                        // A whole tile's worth of row slices, those past its last row repeating it:
                        // the kernel for `n_rows` reads only the first `n_rows`.
                        let row = |r: usize| &packed[(r0 + r.min(n_rows - 1)) * kp + 4 * g0..][..4 * steps];
                        let (o, width) = (&mut out[r0 * stride + c0 - col0..], width_of_pass.min(self.n - c0));
                        let tile_rows: [&[E]; TILE_ROWS] = std::array::from_fn(row);
                        // Safety: isa() was checked by the caller; the slices have the lengths read.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            E::tile(n_rows, w, step, tile_rows, o, stride, width, &next)
                        }
                    }
                }
            }
        }
    }
}

/// Rows packed for this matrix's tile kernel ([`GemvWeights::pack_rows`]).
pub(super) enum PackedRows {
    /// u8 rows, for narrow weights.
    Narrow(Vec<u8>),
    /// i16 `a − a0`, for any weights.
    Centered(Vec<i16>),
}

/// Cache lines to fetch ahead while a tile runs: line `(first + g) mod lines` from `base` at step
/// `g` (none when `lines` is 0).
struct Prefetch {
    base: *const i8,
    first: usize,
    lines: usize,
}

/// A row element with its tile kernel: u8 rows × narrow weights, or i16 centered rows × any.
trait TileElement: Copy + Sized {
    /// Columns per kernel call.
    const COLUMNS: usize;
    /// The kernel for the first `n_rows` of `rows` (≤ [`TILE_ROWS`]), prefetching when
    /// `next.lines` > 0 (a separate instance: a test in the loop slowed the many-row kernel by
    /// a quarter).
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(n_rows: usize, w: &[i8], step: usize, rows: [&[Self]; TILE_ROWS], out: &mut [i32], stride: usize, width: usize, next: &Prefetch);
}

/// Calls `$kernel::<R, PF>` for `R` = `$n` (1..=6) rows of `$r`, `PF` = whether `$next` has
/// lines to prefetch.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_call {
    ($kernel:ident, $n:expr, $w:expr, $step:expr, $r:expr, $out:expr, $stride:expr, $width:expr, $next:expr) => {
        if $next.lines > 0 {
            by_rows!($kernel, true, $n, $w, $step, $r, $out, $stride, $width, $next)
        } else {
            by_rows!($kernel, false, $n, $w, $step, $r, $out, $stride, $width, $next)
        }
    };
}

/// [`tile_call`]'s dispatch for one `PF`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($kernel:ident, $pf:literal, $n:expr, $w:expr, $step:expr, $r:expr, $out:expr, $stride:expr, $width:expr, $next:expr) => {
        match $n {
            1 => $kernel::<1, $pf>($w, $step, [$r[0]], $out, $stride, $width, $next),
            2 => $kernel::<2, $pf>($w, $step, [$r[0], $r[1]], $out, $stride, $width, $next),
            3 => $kernel::<3, $pf>($w, $step, [$r[0], $r[1], $r[2]], $out, $stride, $width, $next),
            4 => $kernel::<4, $pf>($w, $step, [$r[0], $r[1], $r[2], $r[3]], $out, $stride, $width, $next),
            5 => $kernel::<5, $pf>($w, $step, [$r[0], $r[1], $r[2], $r[3], $r[4]], $out, $stride, $width, $next),
            _ => $kernel::<6, $pf>($w, $step, $r, $out, $stride, $width, $next),
        }
    };
}

impl TileElement for i16 {
    const COLUMNS: usize = 8;
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(n_rows: usize, w: &[i8], step: usize, rows: [&[i16]; TILE_ROWS], out: &mut [i32], stride: usize, width: usize, next: &Prefetch) {
        tile_call!(tile_kernel_i16, n_rows, w, step, rows, out, stride, width, next)
    }
}

impl TileElement for u8 {
    const COLUMNS: usize = 16;
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(n_rows: usize, w: &[i8], step: usize, rows: [&[u8]; TILE_ROWS], out: &mut [i32], stride: usize, width: usize, next: &Prefetch) {
        tile_call!(tile_kernel_u8, n_rows, w, step, rows, out, stride, width, next)
    }
}

/// The prefetch of step `g` (see [`Prefetch`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_step(next: &Prefetch, g: usize) {
    // first + g < 2·lines. A prefetch never faults: past the last group it is harmless.
    let line = if next.first + g >= next.lines { next.first + g - next.lines } else { next.first + g };
    _mm_prefetch::<_MM_HINT_T0>(next.base.wrapping_add(line * 64));
}

/// `out[r·stride + c] += Σ_g Σ_t rows[r][4g + t] · w[step·g + 4c + t]` (wrapping) for `R` rows
/// and the first `width` ≤ 8 columns on AVX2.
///
/// Each 16 weight bytes (4 columns × 4 k-values) widen to 16 i16, so `vpmaddwd` with the row's
/// 4 i16 broadcast as one 64-bit word gives, per column, two i32 lanes (k-values 0–1 and 2–3),
/// added pairwise at the end (`vphaddd`, then the 64-bit lanes put back in column order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_kernel_i16<const R: usize, const PF: bool>(w: &[i8], step: usize, rows: [&[i16]; R], out: &mut [i32], stride: usize, width: usize, next: &Prefetch) {
    let steps = rows[0].len() / 4;
    assert!(w.len() == (steps - 1) * step + 32 && rows.iter().all(|r| r.len() == 4 * steps) && width <= 8 && out.len() >= (R - 1) * stride + width);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let p = w.as_ptr();
    for g in 0..steps {
        let wp = p.add(g * step);
        if PF {
            prefetch_step(next, g);
        }
        let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.cast()));
        let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(16).cast()));
        for r in 0..R {
            let x = _mm256_set1_epi64x(std::ptr::read_unaligned(rows[r].as_ptr().add(4 * g).cast::<i64>()));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, b0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, b1));
        }
    }
    for r in 0..R {
        // [c0 c1 c4 c5 | c2 c3 c6 c7] → [c0 … c7].
        let sums = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[r][0], acc[r][1]));
        add_to(&mut out[r * stride..][..width], sums);
    }
}

/// `out[r·stride + c] += Σ_g Σ_t rows[r][4g + t] · w[step·g + 4c + t]` (wrapping) for `R` u8 rows
/// and the first `width` ≤ 16 columns on AVX2, for narrow weights only (pairs within ±128, so
/// `vpmaddubsw` never saturates; see the module's text): each 32 weight bytes are 8 columns'
/// 4 k-values, and `vpmaddubsw` with the row's 4 bytes broadcast, then `vpmaddwd` by 1, gives
/// the 8 columns' sums in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_kernel_u8<const R: usize, const PF: bool>(w: &[i8], step: usize, rows: [&[u8]; R], out: &mut [i32], stride: usize, width: usize, next: &Prefetch) {
    let steps = rows[0].len() / 4;
    assert!(w.len() == (steps - 1) * step + 64 && rows.iter().all(|r| r.len() == 4 * steps) && width <= 16 && out.len() >= (R - 1) * stride + width);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let p = w.as_ptr();
    for g in 0..steps {
        let wp = p.add(g * step);
        if PF {
            prefetch_step(next, g);
        }
        let b0 = _mm256_loadu_si256(wp.cast());
        let b1 = _mm256_loadu_si256(wp.add(32).cast());
        for r in 0..R {
            let x = _mm256_set1_epi32(std::ptr::read_unaligned(rows[r].as_ptr().add(4 * g).cast::<i32>()));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones));
        }
    }
    for r in 0..R {
        let o = &mut out[r * stride..][..width];
        let (lo, hi) = o.split_at_mut(width.min(8));
        add_to(lo, acc[r][0]);
        if !hi.is_empty() {
            add_to(hi, acc[r][1]);
        }
    }
}

/// `o[c] += v[c]` (wrapping) for the first `o.len()` ≤ 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_to(o: &mut [i32], v: __m256i) {
    if o.len() == 8 {
        let p = o.as_mut_ptr().cast::<__m256i>();
        _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), v));
    } else {
        let mut t = [0i32; 8];
        _mm256_storeu_si256(t.as_mut_ptr().cast(), v);
        o.iter_mut().zip(t).for_each(|(o, v)| *o = o.wrapping_add(v));
    }
}
