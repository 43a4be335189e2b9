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
use std::ops::Range;
use std::sync::OnceLock;

use super::weight_memory::WeightBuf;

/// Rows of a tile (a part of rows starting at a multiple has no partial tile but its last).
pub const TILE_ROWS: usize = 16;
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

    /// The right operand's columns (N).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `out[r, n] = Σ_k (a[r, k] − a0) · b[k, n]` for `a: [rows, K]`, in wrapping i32 (exact:
    /// no product or partial sum saturates), `a0` in the left operand's own terms (u8 0–255,
    /// i8 −128–127). Writes every element of `out` (`[rows, N]`) and returns it as
    /// initialized. One thread; call only where [`available`] said yes.
    ///
    /// Panics if the operand sizes disagree (a caller's bug) or without AMX.
    pub fn gemm<'o>(&self, a: Left<'_>, a0: i32, out: &'o mut [MaybeUninit<i32>]) -> &'o mut [i32] {
        let rows = a.len() / self.k;
        assert!(out.len() == rows * self.n, "AmxWeights::gemm: operand sizes");
        let base = out.as_mut_ptr().cast::<i32>();
        // Safety: `out` holds the `[rows, N]` result, borrowed here alone.
        unsafe {
            self.gemm_columns(a, a0, 0..self.n, base);
            std::slice::from_raw_parts_mut(base, rows * self.n)
        }
    }

    /// [`gemm`](Self::gemm) on the columns `cols` only (their ends multiples of
    /// [`COLUMN_STEP`]), written into the `[rows, N]` i32 matrix at `out`: so that threads can
    /// each take a block of the output, rows (a sub-slice of `a`, `out` at its first row) and
    /// columns (`int8::columns`). An i8 left operand is multiplied as it lies (`TDPBSSD`, i8 × i8),
    /// a u8 one by `TDPBUSD`.
    ///
    /// # Safety
    /// `out` is valid for reads and writes of `rows · N` i32 (`rows = a.len() / K`), and no
    /// other thread reads or writes its columns `cols` of those rows meanwhile. Panics as
    /// [`gemm`](Self::gemm) does, or if `cols` is not a range of whole column steps.
    pub unsafe fn gemm_columns(&self, a: Left<'_>, a0: i32, cols: Range<usize>, out: *mut i32) {
        let (k, n) = (self.k, self.n);
        let (bytes, signed) = a.bytes();
        let rows = bytes.len() / k;
        assert!(bytes.len() == rows * k, "AmxWeights::gemm: operand sizes");
        assert!(cols.start <= cols.end && cols.start % COLUMN_STEP == 0 && cols.end % COLUMN_STEP == 0 && cols.end <= n, "AmxWeights::gemm: columns {cols:?} of {n}");
        assert!(available(), "AmxWeights::gemm without AMX");
        let k_tiles = k / TILE_K;
        let whole = rows / TILE_ROWS * TILE_ROWS;
        // The last rows (fewer than a tile) padded with zeros (0 in u8 and i8 alike), and where
        // their sums land.
        let tail: Vec<u8> = {
            let mut t = bytes[whole * k..].to_vec();
            t.resize(TILE_ROWS * k, 0);
            t
        };
        let mut tail_out = vec![0i32; TILE_ROWS * COLUMN_STEP];
        let (two, one): (Kernel, Kernel) = if signed { (kernel_i8::<2>, kernel_i8::<1>) } else { (kernel_u8::<2>, kernel_u8::<1>) };
        // The left zero point's correction, `− a0 · Σ_k b[k, n]`, on rows `rows` of the 32
        // columns at `col`, right after the kernel wrote them (still in L1; a pass over the
        // part's whole output afterwards read it back from L2).
        let col_sums = &self.col_sums;
        let correct = |rows: Range<usize>, col: usize| {
            if a0 == 0 {
                return;
            }
            let s = &col_sums[col..col + COLUMN_STEP];
            for r in rows {
                // Safety: row r's 32 columns at `col`, written just now, this call's alone.
                let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * n + col), COLUMN_STEP) };
                row.iter_mut().zip(s).for_each(|(o, &s)| *o = o.wrapping_sub(a0.wrapping_mul(s)));
            }
        };
        let _tiles = Tiles::configure();
        for pair in cols.start / COLUMN_STEP..cols.end / COLUMN_STEP {
            let col = pair * COLUMN_STEP;
            // Safety (here and in every kernel call below): tiles are configured (`_tiles`);
            // the pair's `2 · k_tiles` weight tiles lie inside `self.tiles` (K·N bytes); each
            // call reads 16 or 32 whole rows of `a` (rows below `whole`) or of `tail` (16), and
            // writes 16 or 32 rows of 32 i32 at stride N into `out` (rows below `whole`: the
            // caller's promise) or at stride 32 into `tail_out` (16 rows), whose real rows are
            // copied into `out`.
            unsafe {
                let b0 = self.tiles.as_ptr().add(2 * pair * k_tiles * TILE_BYTES);
                let b1 = b0.add(k_tiles * TILE_BYTES);
                let mut r = 0;
                while r + 2 * TILE_ROWS <= whole {
                    two(bytes.as_ptr().add(r * k), k, b0, b1, k_tiles, out.add(r * n + col), 4 * n);
                    correct(r..r + 2 * TILE_ROWS, col);
                    r += 2 * TILE_ROWS;
                }
                if r < whole {
                    one(bytes.as_ptr().add(r * k), k, b0, b1, k_tiles, out.add(r * n + col), 4 * n);
                    correct(r..whole, col);
                }
                if whole < rows {
                    one(tail.as_ptr(), k, b0, b1, k_tiles, tail_out.as_mut_ptr(), 4 * COLUMN_STEP);
                    for (i, sums) in tail_out.chunks_exact(COLUMN_STEP).take(rows - whole).enumerate() {
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), out.add((whole + i) * n + col), COLUMN_STEP);
                    }
                    correct(whole..rows, col);
                }
            }
        }
    }
}

/// Columns per kernel call (two output tiles): column ranges of [`AmxWeights::gemm_columns`]
/// start and end at multiples of this.
pub const COLUMN_STEP: usize = 2 * TILE_N;

/// The left operand of [`AmxWeights::gemm`], `[rows, K]`, as the graph holds it.
#[derive(Debug, Clone, Copy)]
pub enum Left<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
}

impl Left<'_> {
    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Left::U8(a) => a.len(),
            Left::I8(a) => a.len(),
        }
    }

    /// `Σ_k a[r, k]` for each row of `k` values.
    pub fn row_sums(&self, k: usize) -> Vec<i32> {
        match self {
            Left::U8(a) => a.chunks_exact(k).map(|r| r.iter().fold(0i32, |s, &v| s.wrapping_add(v as i32))).collect(),
            Left::I8(a) => a.chunks_exact(k).map(|r| r.iter().fold(0i32, |s, &v| s.wrapping_add(v as i32))).collect(),
        }
    }

    /// The rows `rows` (of `k` values each). Panics if they are not all there (a caller's bug).
    pub fn rows(&self, rows: Range<usize>, k: usize) -> Self {
        match *self {
            Left::U8(a) => Left::U8(&a[rows.start * k..rows.end * k]),
            Left::I8(a) => Left::I8(&a[rows.start * k..rows.end * k]),
        }
    }

    /// The values' bytes, and whether they are signed.
    fn bytes(&self) -> (&[u8], bool) {
        match *self {
            Left::U8(a) => (a, false),
            // Safety: i8 and u8 have the same size and alignment, every bit pattern valid.
            Left::I8(a) => (unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len()) }, true),
        }
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

/// A tile kernel: `(a, a_stride, b0, b1, k_tiles, c, c_stride)` (see [`tile_kernel`]).
type Kernel = unsafe fn(*const u8, usize, *const i8, *const i8, usize, *mut i32, usize);

/// Defines `$name::<R>`: `c[r, 0..32] = Σ_k a[r, k] · b[k, 0..32]` for `R` × 16 rows (`R` = 1 or
/// 2) with the tile product `$dp` (`tdpbusd`: u8 left, `tdpbssd`: i8 left): `a` at stride
/// `a_stride` bytes, the two weight column blocks `b0`, `b1` (`k_tiles` tiles each), `c` at
/// stride `c_stride` bytes.
///
/// # Safety (of the function defined)
/// Tiles configured on this thread; every address read or written in bounds (see the caller).
macro_rules! tile_kernel {
    ($name:ident, $dp:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[inline(never)]
        unsafe fn $name<const R: usize>(a: *const u8, a_stride: usize, b0: *const i8, b1: *const i8, k_tiles: usize, c: *mut i32, c_stride: usize) {
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
                        concat!($dp, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm5, [{a1} + {sa} * 1]",
                        concat!($dp, " tmm1, tmm4, tmm7"),
                        concat!($dp, " tmm2, tmm5, tmm6"),
                        concat!($dp, " tmm3, tmm5, tmm7"),
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
                        concat!($dp, " tmm0, tmm4, tmm6"),
                        concat!($dp, " tmm1, tmm4, tmm7"),
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
        unsafe fn $name<const R: usize>(_: *const u8, _: usize, _: *const i8, _: *const i8, _: usize, _: *mut i32, _: usize) {
            unreachable!("AMX kernel off x86-64")
        }
    };
}

tile_kernel!(kernel_u8, "tdpbusd");
tile_kernel!(kernel_i8, "tdpbssd");

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
                let got = w.gemm(Left::U8(&a), a0 as i32, &mut out).to_vec();
                assert_eq!(got, reference(&a, a0, &b, k, n), "u8 left: rows {rows}, K {k}, N {n}, a0 {a0}");
                // The same values as i8 (v − 128, zero point alike): the same differences.
                let signed: Vec<i8> = a.iter().map(|&v| (v ^ 0x80) as i8).collect();
                let got = w.gemm(Left::I8(&signed), a0 as i32 - 128, &mut out).to_vec();
                assert_eq!(got, reference(&a, a0, &b, k, n), "i8 left: rows {rows}, K {k}, N {n}, a0 {a0}");
                // In column parts, as threads take them: the first step's columns, then the rest.
                let mut parts = vec![0i32; rows * n];
                for cols in [0..COLUMN_STEP, COLUMN_STEP..n] {
                    // Safety: `parts` holds `[rows, N]`, used by nothing else meanwhile.
                    unsafe { w.gemm_columns(Left::I8(&signed), a0 as i32 - 128, cols, parts.as_mut_ptr()) };
                }
                assert_eq!(parts, reference(&a, a0, &b, k, n), "in column parts: rows {rows}, K {k}, N {n}, a0 {a0}");
            }
        }
    }
}
