//! Int8 products on AVX-512 VNNI or AVX2, weights laid out once at load: few rows (decoder
//! steps) on every such CPU, many rows where AVX2 has no VNNI.
//!
//! A decoder step multiplies one row per sequence (1 for greedy, 4 for beam 4) by every weight
//! matrix of the decoder: ~137 M int8 weights per token for GPT-2 small with cross-attention
//! and a 50,000-word head, each used once. That is a memory stream, not a GEMM: rten-gemm's
//! blocked kernel (packing the rows, computing whole register tiles for one row) ran it at
//! ~6 GB/s here. This kernel reads the weights exactly once per step, in the order they lie
//! in memory, and keeps up to 4 rows in registers so that beam search costs the same stream.
//!
//! Layout (per group of 64 output columns, `KG = ⌈K/4⌉` steps of 4 along k):
//! `w[((j·KG + g)·4 + q)·64 + c·4 + t] = b[4g + t, 64j + 16q + c]`, zero-padded — so each
//! 64-byte load is the 4 k-values of 16 columns that one `vpdpbusd` multiplies by 4 bytes of
//! the row broadcast to every lane (Intel SDM, VPDPBUSD: u8 × i8, 4 products summed into each
//! i32 lane, no saturation). On AVX2 a 32-byte load is 8 columns' 4 k-values, taken by
//! `vpmaddubsw` + `vpmaddwd` in two 7-bit parts of the row, or the whole row for narrow weights
//! ([`group_kernel_avx2`], [`GemvWeights::narrow`]). Results are exact (wrapping i32, like the
//! definition).
//!
//! The same layout, or for an encoder's matrices its 16-column panels
//! ([`GemvWeights::into_panels`]), serves products of many rows (an encoder's 197) on AVX2 CPUs
//! without VNNI, where rten-gemm's kernel saturates and needs two passes:
//! [`GemvWeights::gemm_tiles`] runs them in one exact pass in register tiles (`tiles`: i16 for
//! any weights, ~65 GMAC/s on an AMD EPYC, Zen 3, against the split's ~42; u8 × narrow weights,
//! ~87).

// The kernels are x86-64 only; elsewhere `available()` is false and nothing here runs.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::amx;
use super::helper_thread;
use super::weight_memory::WeightBuf;

mod tiles;

/// Columns per group: four 16-lane i32 accumulators per row.
const GROUP: usize = 64;
/// Rows held in registers at once on AVX-512 (4 × 4 accumulators + 4 weights + 4 broadcasts
/// ≤ 32 zmm; AVX2 holds 2 in its 16 ymm).
pub const MAX_ROWS: usize = 4;
/// Steps of 4 k-values (256 bytes each) read ahead.
const PREFETCH: usize = 32;

/// The instruction sets [`GemvWeights::gemm`] has a kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX-512 F, BW and VNNI: `vpdpbusd`, 4 rows × 64 columns per pass.
    Vnni512,
    /// AVX2: `vpmaddubsw` on the row's two 7-bit parts, or the whole row for narrow weights
    /// (exact, see [`group_kernel_avx2`]), 1 row × 64 columns or 2 rows × 32 columns per pass.
    Avx2,
}

fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni") {
            return Some(Isa::Vnni512);
        }
        if is_x86_feature_detected!("avx2") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Whether this CPU runs [`GemvWeights`] (x86-64 with AVX-512 VNNI, or AVX2).
pub fn available() -> bool {
    isa().is_some()
}

/// The kernel [`GemvWeights::gemm`] uses on this CPU, for the profile's descriptions.
pub fn kernel_name() -> &'static str {
    match isa() {
        Some(Isa::Vnni512) => "avx512-vnni few-row (vitgpt2)",
        Some(Isa::Avx2) => "avx2 few-row (vitgpt2)",
        None => "none",
    }
}

/// A constant i8 matrix `b [K, N]` in the layout above, with its column sums (for the left
/// operand's zero point: `Σ_k (a − a0)·b = Σ_k a·b − a0·Σ_k b`).
pub struct GemvWeights {
    w: WeightBuf,
    k: usize,
    kg: usize,
    n: usize,
    col_sums: Vec<i32>,
    /// Every pair of k-values that `vpmaddubsw` sums (t = 0, 1 and t = 2, 3 of a step) has
    /// |b₁| + |b₂| ≤ 128, so u8 × these pairs lie within i16 (255·128 = 32,640): AVX2 then
    /// multiplies whole u8 rows in one pass (7-bit weights, e.g. `--reduce-range`, always do).
    narrow: bool,
    /// Laid out for the tiles only, in 16-column panels ([`into_panels`](Self::into_panels));
    /// [`gemm`](Self::gemm) and [`gemm_on_two`](Self::gemm_on_two) then run the tiles too.
    panels: bool,
}

impl GemvWeights {
    /// Lays out `b [K, N]`, element `(k, n)` at `b[k·stride_k + n·stride_n]`. Memory:
    /// `⌈K/4⌉·4 × ⌈N/64⌉·64` bytes.
    ///
    /// Panics if `b` is shorter than the strides say (callers pass tract's own tensor).
    pub fn new(k: usize, n: usize, b: &[i8], stride_k: usize, stride_n: usize) -> Self {
        let kg = k.div_ceil(4);
        let mut w = WeightBuf::zeroed(n.div_ceil(GROUP) * kg * 4 * GROUP);
        let mut col_sums = vec![0i32; n];
        let groups = n.div_ceil(GROUP);
        // Each 256-byte step holds 4 k-values of 64 columns. The loops follow the source's
        // memory order where they can and take the column sums on the way (load time: ~0.26 s
        // for the two graphs' 222 M weights scattering byte by byte; measured), `tests` checks
        // the three paths against each other.
        let whole = k / 4;
        if stride_n == 1 {
            // Row-major `b`: 4 whole rows read in order, interleaved 4 bytes per column into each
            // group's step (the last, partial step below).
            for g in 0..whole {
                let r: [&[i8]; 4] = std::array::from_fn(|t| &b[(4 * g + t) * stride_k..][..n]);
                for (c, s) in col_sums.iter_mut().enumerate() {
                    *s += r[0][c] as i32 + r[1][c] as i32 + r[2][c] as i32 + r[3][c] as i32;
                }
                for j in 0..groups {
                    let cols = GROUP.min(n - j * GROUP);
                    interleave4(r.map(|row| &row[j * GROUP..][..cols]), &mut w[(j * kg + g) * 4 * GROUP..][..4 * cols]);
                }
            }
        }
        // Column-major `b` (a transposed embedding: the LM head), any other strides, and a
        // row-major one's partial last step: group by group, down k.
        let first = if stride_n == 1 { whole } else { 0 };
        for j in 0..groups {
            let cols = GROUP.min(n - j * GROUP);
            for g in first..kg {
                let rows = 4.min(k - 4 * g);
                let dst = &mut w[(j * kg + g) * 4 * GROUP..][..4 * cols];
                if stride_k == 1 && rows == 4 {
                    // Each column's 4 k-values are contiguous.
                    for (col, quad) in dst.chunks_exact_mut(4).enumerate() {
                        quad.copy_from_slice(&b[(j * GROUP + col) * stride_n + 4 * g..][..4]);
                    }
                } else {
                    for t in 0..rows {
                        let row = (4 * g + t) * stride_k + j * GROUP * stride_n;
                        for col in 0..cols {
                            dst[4 * col + t] = b[row + col * stride_n];
                        }
                    }
                }
                for (s, quad) in col_sums[j * GROUP..][..cols].iter_mut().zip(dst.chunks_exact(4)) {
                    *s += quad.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        // In blocks, each folded without an early exit so that it vectorizes (222 M weights).
        let narrow = w.chunks(1 << 12).all(|block| block.chunks_exact(2).fold(true, |ok, p| ok & (p[0].unsigned_abs() as u16 + p[1].unsigned_abs() as u16 <= 128)));
        GemvWeights { w, k, kg, n, col_sums, narrow, panels: false }
    }

    /// The same weights for products of many rows only (an encoder's): each group's four
    /// 16-column parts one after the other, `w[((4j + e)·KG + g)·64 + c·4 + t] = b[4g + t, 64j +
    /// 16e + c]`, so that a tile pass over 16 columns reads ⌈K/4⌉ contiguous 64-byte steps. In the
    /// group layout those steps lie 256 bytes apart, which puts a 768-deep pass (192 lines) in a
    /// quarter of a 32 KiB, 64-set L1's sets, 128 lines' room: the pass fell out of L1 between
    /// tiles of rows.
    pub fn into_panels(mut self) -> Self {
        // K = 0 has no bytes to move (and `chunks_exact_mut` takes no chunks of 0).
        let group_bytes = (self.kg * 4 * GROUP).max(1);
        let mut scratch = vec![0i8; group_bytes];
        for group in self.w.chunks_exact_mut(group_bytes) {
            scratch.copy_from_slice(group);
            for (g, step) in scratch.chunks_exact(4 * GROUP).enumerate() {
                for (e, part) in step.chunks_exact(64).enumerate() {
                    group[(e * self.kg + g) * 64..][..64].copy_from_slice(part);
                }
            }
        }
        self.panels = true;
        self
    }

    /// Whether AVX2 multiplies this matrix in one `vpmaddubsw` pass (see the field's text).
    pub fn narrow(&self) -> bool {
        self.narrow
    }

    /// `out[i, n] = Σ_k (a[i, k] − a0)·b[k, n]` in wrapping i32, for `a` of `m` rows of `K` u8
    /// (row-major) and `out` of `m × N`, on the caller's thread (split by columns across 2
    /// threads it measured slower here: see README "Performance"); 3 rows or more on AVX2
    /// (beam search), and any rows of a matrix in panels, through
    /// [`gemm_tiles`](Self::gemm_tiles). Panics where [`available`] is false.
    pub fn gemm(&self, a: &[u8], m: usize, a0: u8, out: &mut [i32]) {
        assert!(a.len() == m * self.k && out.len() == m * self.n, "GemvWeights::gemm: operand sizes");
        let isa = isa();
        assert!(isa.is_some(), "GemvWeights::gemm on a CPU without AVX-512 VNNI or AVX2");
        if self.panels || (isa == Some(Isa::Avx2) && m >= 3) {
            // Beam search's 4 rows: the split kernel's 2-row passes are bound by arithmetic
            // there (4 multiplies per 32 products); the i16 tiles take half (a beam-4 token's LM
            // head 4.8 → 3.6 ms, measured on an AMD EPYC, Zen 3).
            return self.gemm_tiles(a, m, a0, out);
        }
        let words = self.words(a);
        self.groups(&words, m, a0, 0..self.n.div_ceil(GROUP), out, 0, self.n);
    }

    /// As [`gemm`](Self::gemm), the column groups halved between the calling thread and
    /// [`helper_thread`]'s thread, which stays awake between a step's products: a decoder step's
    /// product is bound by memory bandwidth, and two cores read more. One row (greedy) here; 3
    /// or more on AVX2 (beam search), and any rows of a matrix in panels, through the tiles,
    /// halved the same way; 2 rows (or 2–4 with VNNI) likewise on the group kernels.
    pub fn gemm_on_two(&self, a: &[u8], m: usize, a0: u8, out: &mut [i32]) {
        assert!(a.len() == m * self.k && out.len() == m * self.n, "GemvWeights::gemm_on_two: operand sizes");
        let isa = isa();
        assert!(isa.is_some(), "GemvWeights::gemm_on_two on a CPU without AVX-512 VNNI or AVX2");
        if self.panels || (isa == Some(Isa::Avx2) && m >= 3) {
            return self.tiles_on_two(a, m, a0, out);
        }
        let groups = self.n.div_ceil(GROUP);
        if groups < 2 {
            return self.gemm(a, m, a0, out);
        }
        let words = self.words(a);
        let mid = groups / 2;
        let c_mid = (mid * GROUP).min(self.n);
        if m == 1 {
            let (lo, hi) = out.split_at_mut(c_mid);
            let hi = std::sync::Mutex::new(hi);
            helper_thread::join(
                || self.groups(&words, 1, a0, 0..mid, lo, 0, self.n),
                || self.groups(&words, 1, a0, mid..groups, &mut hi.lock().unwrap_or_else(|e| e.into_inner()), c_mid, self.n),
            );
            return;
        }
        // Several rows (beam search): the right half's columns into a buffer of their own,
        // copied after. On a Xeon with AMX (2 cores), a beam-4 caption at 2 threads 340 ms with
        // these rows whole (its 1-thread time: 357 ms), README "Performance".
        let hi_n = self.n - c_mid;
        let hi = std::sync::Mutex::new(vec![0i32; m * hi_n]);
        helper_thread::join(
            || self.groups(&words, m, a0, 0..mid, out, 0, self.n),
            || self.groups(&words, m, a0, mid..groups, &mut hi.lock().unwrap_or_else(|e| e.into_inner()), c_mid, hi_n),
        );
        let hi = hi.into_inner().unwrap_or_else(|e| e.into_inner());
        for (out_row, hi_row) in out.chunks_exact_mut(self.n).zip(hi.chunks_exact(hi_n)) {
            out_row[c_mid..].copy_from_slice(hi_row);
        }
    }

    /// [`gemm_tiles`](Self::gemm_tiles) for a few rows, the column groups halved with the helper.
    fn tiles_on_two(&self, a: &[u8], m: usize, a0: u8, out: &mut [i32]) {
        let n = self.n;
        let groups = n.div_ceil(GROUP);
        if groups < 2 {
            return self.gemm_tiles(a, m, a0, out);
        }
        let k = self.k;
        let packed = self.pack_rows(m, a0, |r, dst| dst.copy_from_slice(&a[r * k..(r + 1) * k]));
        let mid = groups / 2;
        let c_mid = (mid * GROUP).min(n);
        let mut lo = self.accumulator(a0, m, 0..c_mid);
        let hi = std::sync::Mutex::new(self.accumulator(a0, m, c_mid..n));
        helper_thread::join(
            || self.tiles(&packed, m, &mut lo, c_mid, 0..mid),
            || self.tiles(&packed, m, &mut hi.lock().unwrap_or_else(|e| e.into_inner()), n - c_mid, mid..groups),
        );
        let hi = hi.into_inner().unwrap_or_else(|e| e.into_inner());
        for (r, out_row) in out.chunks_exact_mut(n).enumerate() {
            out_row[..c_mid].copy_from_slice(&lo[r * c_mid..][..c_mid]);
            out_row[c_mid..].copy_from_slice(&hi[r * (n - c_mid)..][..n - c_mid]);
        }
    }

    /// The rows of `a` (each `K` u8) as little-endian u32 words of 4 k-values, zero-padded to ⌈K/4⌉.
    fn words(&self, a: &[u8]) -> Vec<i32> {
        a.chunks_exact(self.k)
            .flat_map(|row| {
                (0..self.kg).map(move |g| {
                    let mut b = [0u8; 4];
                    for (t, v) in b.iter_mut().enumerate() {
                        *v = row.get(4 * g + t).copied().unwrap_or(0);
                    }
                    i32::from_le_bytes(b)
                })
            })
            .collect()
    }

    /// [`gemm`](Self::gemm)'s products for the column groups `groups` into `out`, which holds
    /// columns `col0..` of `m` rows, a row every `stride` elements.
    fn groups(&self, words: &[i32], m: usize, a0: u8, groups: std::ops::Range<usize>, out: &mut [i32], col0: usize, stride: usize) {
        let isa = isa();
        let zero_term = |nn: usize| (a0 as i32).wrapping_mul(self.col_sums[nn]);
        let block = if isa == Some(Isa::Avx2) { 2 } else { MAX_ROWS };
        let mut tile = [[0i32; GROUP]; MAX_ROWS];
        // Several rows (beam search) on AMX where the CPU has it and K fills whole tiles (64
        // k-values: every decoder product). One row stays on `vpdpbusd`: on AMX a token took
        // 13.1–13.3 ms against 11.8–12.9 (beam 4: 376–382 → 360–362 ms, interleaved `bench`).
        let amx = m >= 2 && amx::available() && self.kg % 16 == 0;
        let mut amx_rows: Option<amx::FewRows> = None;
        for j in groups {
            let w = &self.w[j * self.kg * 4 * GROUP..(j + 1) * self.kg * 4 * GROUP];
            let cols = GROUP.min(self.n - j * GROUP);
            for r0 in (0..m).step_by(block) {
                let rows = block.min(m - r0);
                let row = |r: usize| &words[(r0 + r) * self.kg..][..self.kg];
                if amx {
                    let cfg = match amx_rows.take() {
                        Some(c) if c.rows() == rows => c,
                        other => {
                            drop(other);
                            amx::FewRows::configure(rows)
                        }
                    };
                    // Safety: `cfg` is this thread's; `words` holds rows r0.. of 4·kg bytes
                    // (= 64 · kg/16), and the group's kg steps of 256 bytes lie in `w`.
                    unsafe { amx::group_rows(&cfg, words[r0 * self.kg..].as_ptr().cast(), 4 * self.kg, w.as_ptr(), self.kg / 16, &mut tile) };
                    amx_rows = Some(cfg);
                } else {
                    // Safety: isa() was checked above; the slices have the lengths the kernels read.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match (isa, rows) {
                            // One row: the whole 256-byte step in one pass, a plain forward stream
                            // (two 128-byte half passes over the group: 137 MB of decoder weights in
                            // 12.4–13.2 → 9.3–10.7 ms, medians of 30, a stand-alone loop).
                            (Some(Isa::Avx2), 1) if self.narrow => group_kernel_avx2::<1, false, 8>(w, [row(0)], &mut tile, 0),
                            (Some(Isa::Avx2), 1) => group_kernel_avx2::<1, true, 8>(w, [row(0)], &mut tile, 0),
                            // Two rows' 16 accumulators would not fit in 16 ymm: half a group a pass.
                            (Some(Isa::Avx2), _) if self.narrow => (0..cols.div_ceil(32)).for_each(|h| group_kernel_avx2::<2, false, 4>(w, [row(0), row(1)], &mut tile, h)),
                            (Some(Isa::Avx2), _) => (0..cols.div_ceil(32)).for_each(|h| group_kernel_avx2::<2, true, 4>(w, [row(0), row(1)], &mut tile, h)),
                            (_, 1) => group_kernel::<1>(w, [row(0)], &mut tile),
                            (_, 2) => group_kernel::<2>(w, [row(0), row(1)], &mut tile),
                            (_, 3) => group_kernel::<3>(w, [row(0), row(1), row(2)], &mut tile),
                            _ => group_kernel::<4>(w, [row(0), row(1), row(2), row(3)], &mut tile),
                        }
                    }
                }
                for (r, acc) in tile.iter().enumerate().take(rows) {
                    let out_row = &mut out[(r0 + r) * stride + j * GROUP - col0..][..cols];
                    for (c, o) in out_row.iter_mut().enumerate() {
                        *o = acc[c].wrapping_sub(zero_term(j * GROUP + c));
                    }
                }
            }
        }
    }
}

/// Part `h` of a group, `L` vectors of 8 columns wide (columns `8L·h..8L·(h + 1)`; `L` = 8:
/// the whole group, `L` = 4: half), for `R` ≤ 2 rows on AVX2:
/// `tile[r][8L·h + c] = Σ_g dot4(rows[r][g], w[g][8L·h + c])`.
///
/// `vpmaddubsw` sums pairs of u8 × i8 products into i16 with saturation, so the row's 4 bytes
/// go in two parts, `x & 0x7F` and `x & 0x80`: every pair sum of either part lies within i16
/// (|127·(−128)·2| = 32,512; |128·(−128)·2| = 32,768 = −32,768 exactly, the one extreme that
/// still fits). `vpmaddwd` by 1 widens each to i32 (Intel SDM, PMADDUBSW / PMADDWD). Without
/// `SPLIT` the row goes whole, for narrow weights only ([`GemvWeights::narrow`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn group_kernel_avx2<const R: usize, const SPLIT: bool, const L: usize>(w: &[i8], rows: [&[i32]; R], tile: &mut [[i32; GROUP]; MAX_ROWS], h: usize) {
    let kg = rows[0].len();
    debug_assert!(w.len() == kg * 4 * GROUP && (h + 1) * L <= 8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); L]; R];
    let p = w.as_ptr().add(32 * L * h);
    for g in 0..kg {
        let wp = p.add(g * 4 * GROUP);
        let f = wp.wrapping_add(PREFETCH * 4 * GROUP);
        for line in 0..L / 2 {
            _mm_prefetch::<_MM_HINT_T0>(f.wrapping_add(64 * line));
        }
        let wq: [__m256i; L] = std::array::from_fn(|l| _mm256_loadu_si256(wp.add(32 * l).cast()));
        for r in 0..R {
            let x = *rows[r].get_unchecked(g);
            if SPLIT {
                let lo = _mm256_set1_epi32(x & 0x7F7F_7F7F);
                let hi = _mm256_set1_epi32(x & 0x8080_8080_u32 as i32);
                for l in 0..L {
                    let t_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, wq[l]), ones);
                    let t_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, wq[l]), ones);
                    acc[r][l] = _mm256_add_epi32(acc[r][l], _mm256_add_epi32(t_lo, t_hi));
                }
            } else {
                let whole = _mm256_set1_epi32(x);
                for l in 0..L {
                    acc[r][l] = _mm256_add_epi32(acc[r][l], _mm256_madd_epi16(_mm256_maddubs_epi16(whole, wq[l]), ones));
                }
            }
        }
    }
    for r in 0..R {
        for l in 0..L {
            _mm256_storeu_si256(tile[r].as_mut_ptr().add(8 * L * h + 8 * l).cast(), acc[r][l]);
        }
    }
}

/// One group of 64 columns for `R` rows: `tile[r][c] = Σ_g dot4(rows[r][g], w[g][c])`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_kernel<const R: usize>(w: &[i8], rows: [&[i32]; R], tile: &mut [[i32; GROUP]; MAX_ROWS]) {
    let kg = rows[0].len();
    debug_assert!(w.len() == kg * 4 * GROUP);
    let mut acc = [[_mm512_setzero_si512(); 4]; R];
    let p = w.as_ptr();
    for g in 0..kg {
        let wp = p.add(g * 4 * GROUP);
        // 8 KiB ahead in the stream (past this group: the next one follows in memory; a
        // prefetch never faults, so past the end is harmless). Measured on the decoder's
        // matrices: 9.7 vs 10.4–12.4 ms per token's products with the hardware prefetcher alone.
        let f = wp.wrapping_add(PREFETCH * 4 * GROUP);
        for l in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(f.wrapping_add(64 * l));
        }
        let w0 = _mm512_loadu_si512(wp.cast());
        let w1 = _mm512_loadu_si512(wp.add(64).cast());
        let w2 = _mm512_loadu_si512(wp.add(128).cast());
        let w3 = _mm512_loadu_si512(wp.add(192).cast());
        for r in 0..R {
            let x = _mm512_set1_epi32(*rows[r].get_unchecked(g));
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], x, w2);
            acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], x, w3);
        }
    }
    for r in 0..R {
        for q in 0..4 {
            _mm512_storeu_si512(tile[r].as_mut_ptr().add(16 * q).cast(), acc[r][q]);
        }
    }
}

/// `dst[4c + t] = rows[t][c]`: four rows interleaved a byte at a time (SSE2 unpacks, 16 columns
/// at once, on x86-64).
fn interleave4(rows: [&[i8]; 4], dst: &mut [i8]) {
    let cols = dst.len() / 4;
    assert!(rows.iter().all(|r| r.len() >= cols), "interleave4: short rows");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        while done + 16 <= cols {
            // Safety: SSE2 is part of x86-64; 16 bytes read from each row and 64 written, in bounds.
            unsafe {
                let [a, b, c, d] = rows.map(|r| _mm_loadu_si128(r.as_ptr().add(done).cast()));
                let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
                let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
                let out = dst.as_mut_ptr().add(4 * done).cast::<__m128i>();
                _mm_storeu_si128(out, _mm_unpacklo_epi16(ab_lo, cd_lo));
                _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
                _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
                _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
            }
            done += 16;
        }
    }
    for (col, quad) in dst[4 * done..].chunks_exact_mut(4).enumerate() {
        let c = done + col;
        quad.copy_from_slice(&[rows[0][c], rows[1][c], rows[2][c], rows[3][c]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_definition() {
        if !available() {
            return;
        }
        let mut s = 1u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        for &(m, k, n) in &[(1, 1, 1), (1, 768, 130), (4, 17, 65), (5, 9, 200), (9, 64, 64), (3, 3, 3), (2, 40, 700), (13, 1000, 70), (7, 3072, 9)] {
            for narrow in [false, true] {
                // Narrow: within [−64, 64], a quarter at ±64 (with 255s in the rows: the extremes).
                let b: Vec<i8> = (0..k * n)
                    .map(|_| match (narrow, next()) {
                        (false, v) => v as i8,
                        (true, v) if v % 8 == 0 => 64,
                        (true, v) if v % 8 == 1 => -64,
                        (true, v) => ((v % 129) as i16 - 64) as i8,
                    })
                    .collect();
                let a: Vec<u8> = (0..m * k).map(|_| if next() % 4 == 0 { 255 } else { next() }).collect();
                let a0 = next();
                let wts = GemvWeights::new(k, n, &b, n, 1);
                assert!(!narrow || wts.narrow(), "m={m} k={k} n={n}: narrow weights not found narrow");
                let mut out = vec![0; m * n];
                let mut tiles = vec![0; m * n];
                wts.gemm(&a, m, a0, &mut out);
                wts.gemm_tiles(&a, m, a0, &mut tiles);
                let panels = GemvWeights::new(k, n, &b, n, 1).into_panels();
                let (mut in_panels, mut panels_gemm, mut panels_on_two) = (vec![0; m * n], vec![0; m * n], vec![0; m * n]);
                panels.gemm_tiles(&a, m, a0, &mut in_panels);
                panels.gemm(&a, m, a0, &mut panels_gemm);
                panels.gemm_on_two(&a, m, a0, &mut panels_on_two);
                for i in 0..m {
                    for j in 0..n {
                        let want: i32 = (0..k).map(|l| (a[i * k + l] as i32 - a0 as i32) * b[l * n + j] as i32).sum();
                        assert_eq!(out[i * n + j], want, "m={m} k={k} n={n} narrow {narrow} at ({i},{j})");
                        assert_eq!(tiles[i * n + j], want, "tiles: m={m} k={k} n={n} narrow {narrow} at ({i},{j})");
                        assert_eq!(in_panels[i * n + j], want, "panels: m={m} k={k} n={n} narrow {narrow} at ({i},{j})");
                        assert_eq!(panels_gemm[i * n + j], want, "panels, gemm: m={m} k={k} n={n} narrow {narrow} at ({i},{j})");
                        assert_eq!(panels_on_two[i * n + j], want, "panels, on two: m={m} k={k} n={n} narrow {narrow} at ({i},{j})");
                    }
                }
            }
        }
    }

    /// Narrow means every pair `vpmaddubsw` sums within ±128 in magnitude: (64, 64), (−100, −28)
    /// and (−128, 0) are; (65, 64) and (−128, 1) are not, nor a pair split across k-steps' pairs
    /// unless it is one (k-values 1 and 2 are in different pairs).
    #[test]
    fn narrow_is_the_pair_bound() {
        for (pair, narrow) in [([64i8, 64], true), ([-100, -28], true), ([-128, 0], true), ([65, 64], false), ([-128, 1], false)] {
            let b = [pair[0], pair[1], 0, 0];
            assert_eq!(GemvWeights::new(4, 1, &b, 1, 1).narrow(), narrow, "{pair:?}");
        }
        assert!(GemvWeights::new(4, 1, &[0, 100, 100, 0], 1, 1).narrow());
        assert!(!GemvWeights::new(4, 1, &[0, 0, 100, 100], 1, 1).narrow());
    }

    /// Row-major, column-major (the LM head's transposed embedding) and any other strides give
    /// the same layout and column sums.
    #[test]
    fn layouts_agree() {
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as i8
        };
        for &(k, n) in &[(1, 1), (4, 64), (5, 65), (17, 130), (768, 70), (9, 3)] {
            let b: Vec<i8> = (0..k * n).map(|_| next()).collect();
            let row_major = GemvWeights::new(k, n, &b, n, 1);
            let bt: Vec<i8> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let col_major = GemvWeights::new(k, n, &bt, 1, k);
            // Every element twice, the second copy ignored: strides (2n, 2), the generic path.
            let spread: Vec<i8> = b.iter().flat_map(|&v| [v, 0]).collect();
            let strided = GemvWeights::new(k, n, &spread, 2 * n, 2);
            let sums: Vec<i32> = (0..n).map(|c| (0..k).map(|r| b[r * n + c] as i32).sum()).collect();
            for (what, other) in [("column-major", &col_major), ("strided", &strided)] {
                assert!(*other.w == *row_major.w, "{what} layout differs, k={k} n={n}");
            }
            for (what, wts) in [("row-major", &row_major), ("column-major", &col_major), ("strided", &strided)] {
                assert_eq!(wts.col_sums, sums, "{what} column sums, k={k} n={n}");
            }
        }
    }
}
