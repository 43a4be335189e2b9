//! Many-row int8 products on Intel AMX (AMX-INT8: Sapphire Rapids and later Xeons), for the
//! encoder's 197-row products where the CPU has it.
//!
//! On such a CPU onnxruntime's int8 products run on AMX (MLAS's `QgemmU8S8KernelAmx`) and
//! its encoder took 59 ms against our 126 ms on rten-gemm's AVX-512 VNNI kernel (README
//! "Performance"). One `TDPBUSD` multiplies a 16 × 64 u8 tile by a 64 × 16 i8 tile into 16 × 16
//! i32 sums, exactly (i32 accumulation of u8·i8 products, no intermediate saturation), so the
//! results equal rten-gemm's and tract's.
//!
//! Layout: the left operand is read where it lies (`[rows, K]` u8, a tile is 16 rows of 64
//! bytes at stride K); the weights are laid out once at load in 1 KiB tiles, each 16 columns ×
//! 64 k as `TDPBUSD` reads them (row `g`, byte `4c + q` = `b[64t + 4g + q, 16j + c]`), a column
//! block's tiles one after the other along k. The kernel keeps 2 × 2 output tiles (32 rows ×
//! 32 columns) in registers `tmm0–3`, with two left tiles (`tmm4–5`) and two weight tiles
//! (`tmm6–7`) per step of 64 k. Column blocks run outermost, so a pair's weights (48–192 KiB)
//! stay in L2 while the left operand (≤ 600 KiB) streams from it.
//!
//! Linux hands AMX's 8 KiB of tile state to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16,
//! Documentation/arch/x86/xstate.rst); [`available`] asks once and says no where it is refused.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::weight_memory::WeightBuf;

/// Rows of a tile.
const TILE_ROWS: usize = 16;
/// k values (u8 bytes) of a left tile.
const TILE_K: usize = 64;
/// i32 columns of an output tile.
const TILE_N: usize = 16;
/// Bytes of a weight tile (16 rows of 64).
const TILE_BYTES: usize = 1024;

/// Whether this CPU and OS run AMX-INT8 here (asked once; `VITGPT2_AMX=0` says no, to compare).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VITGPT2_AMX").as_deref() != Ok("0") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8 (Intel SDM vol. 2A, CPUID).
    #[allow(unused_unsafe)]
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (3 << 24) != 3 << 24 {
        return false;
    }
    // arch/x86/include/uapi/asm/prctl.h: ARCH_REQ_XCOMP_PERM 0x1023; XFEATURE_XTILEDATA 18.
    // Safety: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The kernel's name (logs, the bench's report).
pub const KERNEL_NAME: &str = "x86_64 amx-int8 (vitgpt2, exact)";

/// A constant `[K, N]` i8 right operand laid out for [`gemm`](Self::gemm).
pub struct AmxWeights {
    k: usize,
    n: usize,
    tiles: WeightBuf,
    /// `Σ_k b[k, n]`, for the left zero point (`Σ (a − a0)·b = Σ a·b − a0·Σ b`).
    col_sums: Vec<i32>,
}

impl AmxWeights {
    /// Whether `[K, N]` weights fit the tiles whole (K a multiple of 64, N of 32: every
    /// product of the encoder).
    pub fn fits(k: usize, n: usize) -> bool {
        k > 0 && n > 0 && k % TILE_K == 0 && n % (2 * TILE_N) == 0
    }

    /// Lays out `b[k, n] = b[k · stride_k + n · stride_n]` (shape `[K, N]`, which must
    /// [`fit`](Self::fits)).
    pub fn new(k: usize, n: usize, b: &[i8], stride_k: usize, stride_n: usize) -> Self {
        assert!(Self::fits(k, n), "AmxWeights: {k} × {n} do not fit whole tiles");
        let k_tiles = k / TILE_K;
        let mut tiles = WeightBuf::zeroed(k * n);
        let mut col_sums = vec![0i32; n];
        // Along b's rows (its usual layout, stride_n = 1, read in order): row r goes to tile
        // row (r % 64) / 4, byte 4c + r % 4 of each column block's tile r / 64.
        for r in 0..k {
            let (t, g, q) = (r / TILE_K, (r % TILE_K) / 4, r % 4);
            for c in 0..n {
                let v = b[r * stride_k + c * stride_n];
                let (j, cc) = (c / TILE_N, c % TILE_N);
                tiles[(j * k_tiles + t) * TILE_BYTES + g * TILE_K + 4 * cc + q] = v;
                col_sums[c] = col_sums[c].wrapping_add(v as i32);
            }
        }
        AmxWeights { k, n, tiles, col_sums }
    }

    /// `out[r, n] = Σ_k (a[r, k] − a0) · b[k, n]` for `a: [rows, K]` (u8), in wrapping i32
    /// (exact: no product or partial sum saturates). Writes every element of `out`
    /// (`[rows, N]`) and returns it as initialized. One thread; call only where
    /// [`available`] said yes.
    ///
    /// The tiles are stored straight into `out` (the last rows through a buffer). Tried and
    /// lost: dequantizing each 32 × 32 block from an L1 buffer right after its store (no i32
    /// result): the 2-thread encoder 55–57 → 64–66 ms, interleaved `bench` pairs.
    ///
    /// Panics if the operand sizes disagree (a caller's bug) or without AMX.
    pub fn gemm<'o>(&self, a: &[u8], a0: u8, out: &'o mut [MaybeUninit<i32>]) -> &'o mut [i32] {
        let (k, n) = (self.k, self.n);
        let rows = a.len() / k;
        assert!(a.len() == rows * k && out.len() == rows * n, "AmxWeights::gemm: operand sizes");
        assert!(available(), "AmxWeights::gemm without AMX");
        let k_tiles = k / TILE_K;
        let whole = rows / TILE_ROWS * TILE_ROWS;
        // The last rows (fewer than a tile) padded with zeros, and where their sums land.
        let tail: Vec<u8> = {
            let mut t = a[whole * k..].to_vec();
            t.resize(TILE_ROWS * k, 0);
            t
        };
        let mut tail_out = vec![0i32; TILE_ROWS * 2 * TILE_N];
        let base = out.as_mut_ptr().cast::<i32>();
        let _tiles = Tiles::configure();
        for pair in 0..n / (2 * TILE_N) {
            let col = 2 * pair * TILE_N;
            // Safety (here and in every `kernel` call below): tiles are configured (`_tiles`);
            // the pair's `2 · k_tiles` weight tiles lie inside `self.tiles` (K·N bytes); each
            // call reads 16 or 32 whole rows of `a` (rows below `whole`) or of `tail` (16), and
            // writes 16 or 32 rows of 32 i32 at stride N into `out` (rows below `whole`) or at
            // stride 32 into `tail_out` (16 rows), whose real rows are copied into `out`.
            unsafe {
                let b0 = self.tiles.as_ptr().add(2 * pair * k_tiles * TILE_BYTES);
                let b1 = b0.add(k_tiles * TILE_BYTES);
                let mut r = 0;
                while r + 2 * TILE_ROWS <= whole {
                    kernel::<2>(a.as_ptr().add(r * k), k, b0, b1, k_tiles, base.add(r * n + col), 4 * n);
                    r += 2 * TILE_ROWS;
                }
                if r < whole {
                    kernel::<1>(a.as_ptr().add(r * k), k, b0, b1, k_tiles, base.add(r * n + col), 4 * n);
                }
                if whole < rows {
                    kernel::<1>(tail.as_ptr(), k, b0, b1, k_tiles, tail_out.as_mut_ptr(), 4 * 2 * TILE_N);
                    // Through `base` too (no new borrow of `out` while `base` is in use): the
                    // real tail rows' 32 sums each, inside `out`.
                    for (i, sums) in tail_out.chunks_exact(2 * TILE_N).take(rows - whole).enumerate() {
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), base.add((whole + i) * n + col), 2 * TILE_N);
                    }
                }
            }
        }
        // Safety: every element was written above (rows below `whole` by the kernel, the
        // others from `tail_out`).
        let out = unsafe { std::slice::from_raw_parts_mut(base, rows * n) };
        if a0 != 0 {
            for row in out.chunks_exact_mut(n) {
                row.iter_mut().zip(&self.col_sums).for_each(|(o, &s)| *o = o.wrapping_sub((a0 as i32).wrapping_mul(s)));
            }
        }
        out
    }
}

/// The tile configuration (palette 1: 8 tiles of up to 16 rows × 64 bytes), loaded on this
/// thread while it lives and released after (so that the OS need not save the tiles).
struct Tiles;

/// `LDTILECFG`'s 64-byte operand (Intel SDM vol. 1, 3.2 "Tile configuration").
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    fn configure() -> Tiles {
        Self::configure_with(TILE_ROWS as u8)
    }

    /// Output tiles (`tmm0–3`) and the left tile (`tmm4`) of `rows` rows, the others of 16.
    fn configure_with(rows: u8) -> Tiles {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        cfg.colsb[..8].fill(64);
        cfg.rows[..8].fill(TILE_ROWS as u8);
        cfg.rows[..5].fill(rows);
        // Safety: AMX is available (checked by the caller) and `cfg` is a valid palette-1
        // configuration.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly))
        };
        let _ = &cfg;
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // Safety: tiles were configured by `configure`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem))
        };
    }
}

/// The tile configuration for [`group_rows`]: left and output tiles of `rows` rows (1–16),
/// weight tiles of 16; released when dropped.
pub struct FewRows {
    rows: usize,
    _tiles: Tiles,
}

impl FewRows {
    /// Configures this thread's tiles for `rows` rows. Call only where [`available`] said yes.
    pub fn configure(rows: usize) -> FewRows {
        assert!((1..=TILE_ROWS).contains(&rows) && available(), "amx::FewRows: {rows} rows");
        FewRows { rows, _tiles: Tiles::configure_with(rows as u8) }
    }

    /// The rows configured.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A decoder step's product on the few-row kernel's own weight layout (`int8_gemv`: steps of
/// 256 bytes, 4 k-values of 64 columns, one group of 64 columns after another), read in place:
/// a weight tile is 16 steps × 64 bytes at stride 256. `tile[r][c] = Σ_k a[r, k] · w[k, c]`
/// for the configured rows of `a` (u8 at stride `a_stride` bytes, `64 · k_tiles` values each)
/// and the group's 64 columns. Beam search's 4 rows cost the tiles what one row does, where
/// `vpdpbusd` does 4 times the arithmetic (README "Performance").
///
/// # Safety
/// `cfg` configured on this thread; `a` holds `cfg.rows()` rows of `64 · k_tiles` bytes at
/// stride `a_stride`; `group` points at a group's `16 · k_tiles` steps of 256 bytes.
pub unsafe fn group_rows(cfg: &FewRows, a: *const u8, a_stride: usize, group: *const i8, k_tiles: usize, tile: &mut [[i32; 64]]) {
    assert!(tile.len() >= cfg.rows(), "amx::group_rows: output rows");
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {sa} * 1]",
            "tileloadd tmm5, [{w} + {sw} * 1]",
            "tileloadd tmm6, [{w} + {sw} * 1 + 64]",
            "tileloadd tmm7, [{w} + {sw} * 1 + 128]",
            "tdpbusd tmm0, tmm4, tmm5",
            "tileloadd tmm5, [{w} + {sw} * 1 + 192]",
            "tdpbusd tmm1, tmm4, tmm6",
            "tdpbusd tmm2, tmm4, tmm7",
            "tdpbusd tmm3, tmm4, tmm5",
            "add {a}, 64",
            "add {w}, 4096",
            "dec {kt}",
            "jnz 2b",
            "tilestored [{c} + {sc} * 1], tmm0",
            "tilestored [{c} + {sc} * 1 + 64], tmm1",
            "tilestored [{c} + {sc} * 1 + 128], tmm2",
            "tilestored [{c} + {sc} * 1 + 192], tmm3",
            a = inout(reg) a => _,
            w = inout(reg) group => _,
            kt = inout(reg) k_tiles => _,
            sa = in(reg) a_stride,
            sw = in(reg) 256usize,
            c = in(reg) tile.as_mut_ptr(),
            sc = in(reg) 256usize,
            options(nostack),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (a, a_stride, group, k_tiles);
}

/// `c[r, 0..32] = Σ_k a[r, k] · b[k, 0..32]` for `R` × 16 rows (`R` = 1 or 2): `a` at stride
/// `a_stride` bytes, the two weight column blocks `b0`, `b1` (`k_tiles` tiles each), `c` at
/// stride `c_stride` bytes.
///
/// # Safety
/// Tiles configured on this thread; every address read or written in bounds (see the caller).
#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe fn kernel<const R: usize>(a: *const u8, a_stride: usize, b0: *const i8, b1: *const i8, k_tiles: usize, c: *mut i32, c_stride: usize) {
    use std::arch::asm;
    if R == 2 {
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbusd tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {kt}",
                "jnz 2b",
                "tilestored [{c0} + {sc} * 1], tmm0",
                "tilestored [{c0} + {sc} * 1 + 64], tmm1",
                "tilestored [{c1} + {sc} * 1], tmm2",
                "tilestored [{c1} + {sc} * 1 + 64], tmm3",
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.add(TILE_ROWS * a_stride) => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                kt = inout(reg) k_tiles => _,
                sa = in(reg) a_stride,
                sb = in(reg) TILE_K,
                c0 = in(reg) c,
                c1 = in(reg) c.byte_add(TILE_ROWS * c_stride),
                sc = in(reg) c_stride,
                options(nostack),
            );
        }
    } else {
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "2:",
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "add {a0}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {kt}",
                "jnz 2b",
                "tilestored [{c0} + {sc} * 1], tmm0",
                "tilestored [{c0} + {sc} * 1 + 64], tmm1",
                a0 = inout(reg) a => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                kt = inout(reg) k_tiles => _,
                sa = in(reg) a_stride,
                sb = in(reg) TILE_K,
                c0 = in(reg) c,
                sc = in(reg) c_stride,
                options(nostack),
            );
        }
    }
}

/// No AMX off x86-64 ([`available`] is false there, so this is never called).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(_: *const u8, _: usize, _: *const i8, _: *const i8, _: usize, _: *mut i32, _: usize) {
    unreachable!("AMX kernel off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Σ_k (a − a0)·b` by the definition, in i64 (no wrapping at these sizes).
    fn reference(a: &[u8], a0: u8, b: &[i8], k: usize, n: usize) -> Vec<i32> {
        let rows = a.len() / k;
        let mut out = vec![0i32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let s: i64 = (0..k).map(|i| (a[r * k + i] as i64 - a0 as i64) * b[i * n + c] as i64).sum();
                out[r * n + c] = s as i32;
            }
        }
        out
    }

    #[test]
    fn equals_the_definition_on_every_row_and_column_form() {
        if !available() {
            eprintln!("skipped: this CPU or OS has no AMX-INT8 (the product runs on rten-gemm here)");
            return;
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for &(rows, k, n) in &[(1, 64, 32), (5, 128, 64), (16, 64, 32), (17, 192, 32), (33, 64, 96), (48, 128, 32), (197, 768, 64)] {
            // Extremes included: 255 × −128 in every position of some rows.
            let a: Vec<u8> = (0..rows * k).map(|i| if i / k == 0 { 255 } else { next() as u8 }).collect();
            let b: Vec<i8> = (0..k * n).map(|i| if i % 7 == 0 { -128 } else { next() as i8 }).collect();
            let w = AmxWeights::new(k, n, &b, n, 1);
            for a0 in [0u8, 3, 128, 255] {
                let mut out = vec![MaybeUninit::uninit(); rows * n];
                let got = w.gemm(&a, a0, &mut out).to_vec();
                assert_eq!(got, reference(&a, a0, &b, k, n), "rows {rows}, K {k}, N {n}, a0 {a0}");
            }
        }
    }
}
