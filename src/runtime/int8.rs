//! The int8 matrix products of a graph on rten-gemm and our own kernels ([`int8_gemv`]),
//! inside tract (issue #15).
//!
//! tract turns ONNX `MatMulInteger` (our fast layout's int8 linears, and the
//! `DynamicQuantizeLinear` → `MatMulInteger` pairs of onnxruntime's and Optimum's quantized
//! exports) into a quantized `EinSum` whose int8 kernel ran at ~100–130 GMAC/s here, slower
//! than onnxruntime's whole encoder. [`substitute`] runs after tract's declutter pass and before
//! its optimizer: every such product with a constant right-hand matrix becomes an
//! [`Int8MatMul`], which lays that matrix out once at load and runs on rten-gemm's u8×i8
//! kernels (AVX-512 VNNI / AVX-VNNI / AVX2 on x86-64, i8mm / dotprod / NEON on aarch64) or on
//! [`int8_gemv`]'s (few rows on x86-64; many rows where AVX2 has no VNNI). [`fuse_dequantize`]
//! then folds the f32 rescaling that follows each product into it (and `runtime::quantize` the
//! quantization before it). The rest of the graph, the optimizer and the executor stay tract's.
//!
//! Exactness: both compute `Σ_k (a − a0)(b − b0)` in i32. rten-gemm takes the left operand as
//! u8 and the right as i8, so an i8 left operand is shifted by +128 (xor 0x80) with its zero
//! point shifted alike, and a u8 right operand by −128, which changes neither difference. The
//! one kernel that can round (x86-64 AVX2 without VNNI, whose `vpmaddubsw` saturates pairs of
//! products to i16) gets the left operand in two 7-bit parts, each exact (see the eval) — and
//! where our tiles run ([`tiles_available`]), one exact pass in their place (i16, or u8 for
//! narrow weights: `int8_gemv`); tract's
//! own int8 kernel there (`avx2_mmm_i32_8x8`) measured ~0.5 GMAC/s on an AMD EPYC (Zen 3), 37 s
//! per encoder, 70× slower than the same model in f32. `tests/int8_gemm.rs` checks
//! equality with tract's own `MatMulInteger` on random shapes, odd edge sizes and every
//! operand type and zero-point form.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rten_gemm::{GemmExecutor, PackedBMatrix};
use rten_tensor::{Matrix, NdTensorView};

use super::graph::swap_node;
use super::amx::{self, AmxWeights};
use super::helper_thread;
use super::int8_gemv::{self, GemvWeights};
pub(crate) use rows::written_tensor;
use rows::dequantize_rows;

mod columns;
mod rows;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// The u8 × i8 → i32 executor, chosen once for this CPU.
fn executor() -> &'static GemmExecutor<u8, i8, i32> {
    // Leaked once: the executor is Sync but not Send, so it cannot sit in a OnceLock itself.
    static EXECUTOR: OnceLock<&'static GemmExecutor<u8, i8, i32>> = OnceLock::new();
    EXECUTOR.get_or_init(|| Box::leak(Box::new(GemmExecutor::default())))
}

/// The rten-gemm kernel products run on here (e.g. `x86_64-u8i8i32-avx512`); one that can
/// saturate (AVX2 without VNNI) runs each product as two exact ones (see [`Int8MatMul`]'s eval),
/// which the name says.
pub fn kernel() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    let gemm = executor();
    NAME.get_or_init(|| if gemm.may_saturate() { format!("{} (7-bit split, exact)", gemm.kernel_name()) } else { gemm.kernel_name().to_string() })
}

const TILES_NAME: &str = "avx2 i16 tiles (vitgpt2, exact)";
/// For narrow (e.g. 7-bit) weights: one `vpmaddubsw` pass ([`GemvWeights::narrow`]).
const NARROW_TILES_NAME: &str = "avx2 u8 tiles, narrow weights (vitgpt2, exact)";

/// Whether products of many rows run on [`GemvWeights::gemm_tiles`] rather than rten-gemm:
/// where rten-gemm's kernel saturates (x86-64 AVX2 without VNNI) and so needs two passes.
pub fn tiles_available() -> bool {
    executor().may_saturate() && int8_gemv::available()
}

/// The kernels products run on here, few rows then many (for logs and the bench's report).
pub fn kernels() -> String {
    let few = if int8_gemv::available() { int8_gemv::kernel_name() } else { kernel() };
    let many = if amx::available() {
        amx::KERNEL_NAME
    } else if tiles_available() { "avx2 i16 tiles, u8 for narrow weights (vitgpt2, exact)" } else { kernel() };
    format!("{few} (few rows), {many} (many rows)")
}

static THREADS: AtomicUsize = AtomicUsize::new(1);

/// The threads set by [`set_threads`] (1 by default).
pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Products with fewer rows run single-threaded (see `with_threads`).
const PARALLEL_MIN_ROWS: usize = 16;

/// Threads for the int8 products (the node's `--threads`). One thread runs each product on the
/// caller's thread: rayon's global pool is made single-threaded at the first call, when nothing
/// has started it yet (in the node, nothing does) — so a program embedding this library and
/// using rayon's global pool for its own work should start that pool first; more threads run in
/// a pool of that size, shared with tract.
pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::Relaxed);
    // Fails when the pool already exists (e.g. candle started it in vitgpt2-host): products
    // then run in a one-thread pool of their own, a little slower, same results.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(1).build_global();
}

/// The rayon pool of `n` threads the products run in, made once per size and shared with
/// tract's executor (see `runtime::set_threads`): two pools on a small CPU would spin against
/// each other.
pub fn thread_pool(n: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = pools.iter().find(|(k, _)| *k == n) {
        return Some(p.clone());
    }
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().thread_name(|i| format!("vitgpt2-mm-{i}")).num_threads(n).build().ok()?);
    pools.push((n, pool.clone()));
    Some(pool)
}

/// Runs `f` where rayon (so rten-gemm) sees exactly the configured number of threads; products
/// of fewer than [`PARALLEL_MIN_ROWS`] rows (decoder steps) stay on one thread, where handing
/// each of a token's ~100 small products to the pool cost more than it saved (measured: 2
/// threads made a token 10 % slower).
pub(crate) fn with_threads<R: Send>(rows: usize, f: impl FnOnce() -> R + Send) -> R {
    let n = if rows < PARALLEL_MIN_ROWS { 1 } else { THREADS.load(Ordering::Relaxed) };
    if rayon::current_num_threads() == n {
        return f();
    }
    match thread_pool(n) {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Whether a product (or another op) of `rows` rows runs in two halves, one on
/// [`helper_thread`]'s thread ([`helper_thread::join_rows`]) rather than on rayon's pool:
/// with 2 threads (where one helper is all it takes), for as many rows as [`with_threads`]
/// splits, and only where rayon's own pool is not in use (in the node it never is: the
/// global pool has one thread, so rten-gemm runs each half on its own thread).
pub(crate) fn on_helper(rows: usize) -> bool {
    rows >= PARALLEL_MIN_ROWS && helper_takes(threads()) && rayon::current_num_threads() == 1
}

/// Whether, at `threads` threads, the parallel ops of ours take the helper thread rather than
/// rayon's pool (2 threads, `VITGPT2_HELPER_SPLIT` not 0); `runtime::set_threads` then keeps
/// tract's own element-wise ops single-threaded too.
pub fn helper_takes(threads: usize) -> bool {
    threads == 2 && helper_split_enabled()
}

/// `VITGPT2_HELPER_SPLIT=0` keeps the many-row ops on rayon's pool (for comparison).
fn helper_split_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VITGPT2_HELPER_SPLIT").as_deref() != Ok("0"))
}

/// The left operand's zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LeftZero {
    /// Known at load (already shifted to u8 terms).
    Const(u8),
    /// The op's second input, a one-element tensor of the left operand's type
    /// (`DynamicQuantizeLinear`'s zero point).
    Input,
}

/// A dequantization folded into an [`Int8MatMul`]: `y[r, c] = (f32(acc[r, c]) · s[r]) · ws[c]
/// (+ bias[c])`, the graph's order and roundings ([`fuse_dequantize`]).
#[derive(Clone)]
struct Dequantize {
    /// Column scales `ws [N]`.
    scales: Arc<[f32]>,
    /// The bias `[N]` added after, if the graph has one.
    bias: Option<Arc<[f32]>>,
    /// The exact GELU after that (ViT's FC1), tract's arithmetic (`f32_ops::gelu_exact`).
    pub(super) gelu: bool,
}

impl Dequantize {
    /// The GELU, if folded, over finished values (whole rows or a row's columns: element-wise,
    /// so the same bits however they are cut).
    fn activate(&self, y: &mut [f32]) -> TractResult<()> {
        if self.gelu {
            super::f32_ops::gelu_exact(y)?;
        }
        Ok(())
    }

    /// [`activate`](Self::activate) on a finished output tensor.
    fn activate_tensor(&self, mut y: Tensor) -> TractResult<Tensor> {
        if self.gelu {
            let mut ram = y.try_as_plain_ram_mut()?;
            self.activate(ram.as_slice_mut::<f32>()?)?;
        }
        Ok(y)
    }

    /// Columns `cols` of one row: `acc` and `y` hold those columns, `s` is the row's scale.
    fn row(&self, acc: &[i32], s: f32, cols: Range<usize>, y: &mut [MaybeUninit<f32>]) {
        let ws = &self.scales[cols.clone()];
        match &self.bias {
            None => y.iter_mut().zip(acc).zip(ws).for_each(|((y, &acc), &w)| _ = y.write((acc as f32 * s) * w)),
            Some(b) => y.iter_mut().zip(acc).zip(ws).zip(&b[cols]).for_each(|(((y, &acc), &w), &b)| _ = y.write((acc as f32 * s) * w + b)),
        }
    }

    /// As [`row`](Self::row) in place: `y` holds the row's i32 sums (written as i32) and gets
    /// their values.
    fn row_in_place(&self, y: &mut [MaybeUninit<f32>], s: f32, cols: Range<usize>) {
        // Safety (both loops): each element holds an i32 written by the product (4 bytes, read
        // as such before it is overwritten).
        let acc = |y: &MaybeUninit<f32>| unsafe { y.as_ptr().cast::<i32>().read() };
        let ws = &self.scales[cols.clone()];
        match &self.bias {
            None => y.iter_mut().zip(ws).for_each(|(y, &w)| _ = y.write((acc(y) as f32 * s) * w)),
            Some(b) => y.iter_mut().zip(ws).zip(&b[cols]).for_each(|((y, &w), &b)| _ = y.write((acc(y) as f32 * s) * w + b)),
        }
    }
}

/// The constant right operand, laid out once at load for one of the kernels.
#[derive(Clone)]
enum Weights {
    /// rten-gemm's packed blocks (products of many rows: the encoder).
    Packed(Arc<PackedBMatrix<i8>>),
    /// AMX tiles (products of many rows where the CPU has AMX-INT8: [`amx`]).
    Amx(Arc<AmxWeights>),
    /// [`GemvWeights`] (products of a few rows: decoder steps).
    Gemv(Arc<GemvWeights>),
    /// The same layout for many rows on AVX2 without VNNI ([`GemvWeights::gemm_tiles`], one
    /// exact pass where rten-gemm needs two).
    Tiles(Arc<GemvWeights>),
}

/// `y[.., n] = Σ_k (a[.., k] − a0)(b[k, n] − b0[n])` in i32, `b` laid out once at load; with
/// `dequantize`, `y[r, n] = (f32(acc[r, n]) · s[r]) · ws[n]` in f32 instead (see
/// [`fuse_dequantize`]).
///
/// Inputs: `a` (i8 or u8, `[.., K]`, any leading dims), for [`LeftZero::Input`] the zero point
/// `a0` (one element), and with `dequantize` the row scales `s` (`[.., 1]`, f32). Output: i32
/// (or f32) `[.., N]`.
#[derive(Clone)]
pub struct Int8MatMul {
    weights: Weights,
    k: usize,
    n: usize,
    /// b0 per column, in i8 terms (see the module docs); `None` when all are zero. rten-gemm
    /// ignores zero points of a pre-packed matrix (they are taken at packing, and prepacking
    /// takes none), so `b0[n] · Σ_k (a − a0)` is subtracted here after the product.
    b_zero: Option<Arc<[i32]>>,
    /// The left operand is i8 (shifted by +128 at every call).
    a_signed: bool,
    a_zero: LeftZero,
    /// A folded dequantization (f32 out; see [`fuse_dequantize`]).
    dequantize: Option<Dequantize>,
}

impl std::fmt::Debug for Int8MatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Int8MatMul({}, k={}, n={}, a={}, a0={:?}, b0={}, dequantize={})",
            self.kernel(),
            self.k,
            self.n,
            if self.a_signed { "i8" } else { "u8" },
            self.a_zero,
            self.b_zero.is_some(),
            self.dequantize.is_some()
        )
    }
}

impl PartialEq for Int8MatMul {
    fn eq(&self, other: &Self) -> bool {
        let same = match (&self.weights, &other.weights) {
            (Weights::Packed(a), Weights::Packed(b)) => Arc::ptr_eq(a, b),
            (Weights::Amx(a), Weights::Amx(b)) => Arc::ptr_eq(a, b),
            (Weights::Gemv(a), Weights::Gemv(b)) | (Weights::Tiles(a), Weights::Tiles(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let same_scales = match (&self.dequantize, &other.dequantize) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.scales, &b.scales) && a.bias.as_ref().map(Arc::as_ptr) == b.bias.as_ref().map(Arc::as_ptr) && a.gelu == b.gelu,
            (a, b) => a.is_none() && b.is_none(),
        };
        same && same_scales && self.a_signed == other.a_signed && self.a_zero == other.a_zero
    }
}
impl Eq for Int8MatMul {}

impl Int8MatMul {
    /// Whether the op ends in f32, its dequantization folded in ([`fuse_dequantize`]).
    pub fn dequantizes(&self) -> bool {
        self.dequantize.is_some()
    }

    /// The kernel this product runs on.
    fn kernel(&self) -> &'static str {
        match &self.weights {
            Weights::Packed(_) => kernel(),
            Weights::Amx(_) => amx::KERNEL_NAME,
            Weights::Gemv(_) => int8_gemv::kernel_name(),
            Weights::Tiles(w) if w.narrow() => NARROW_TILES_NAME,
            Weights::Tiles(_) => TILES_NAME,
        }
    }
}

impl Op for Int8MatMul {
    fn name(&self) -> StaticName {
        "Int8MatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let out = if self.dequantize.is_some() { ", f32 out" } else { "" };
        Ok(vec![format!("{}: K={} N={}, left {}{out}", self.kernel(), self.k, self.n, if self.a_signed { "i8" } else { "u8" })])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = &inputs[0];
        let shape = a.shape();
        ensure!(shape.last() == Some(&self.k), "Int8MatMul: input shape {shape:?}, expected last dim {}", self.k);
        let m: usize = shape[..shape.len() - 1].iter().product();
        let mut out_shape: TVec<usize> = shape[..shape.len() - 1].into();
        out_shape.push(self.n);
        let a0 = match self.a_zero {
            LeftZero::Const(z) => z,
            LeftZero::Input => {
                let z = inputs.get(1).context("Int8MatMul: missing zero-point input")?;
                ensure!(z.len() == 1, "Int8MatMul: zero point of shape {:?}", z.shape());
                let v = z.cast_to::<i32>()?.try_as_plain_ram()?.as_slice::<i32>()?[0] + if self.a_signed { 128 } else { 0 };
                u8::try_from(v).map_err(|_| format_err!("Int8MatMul: zero point {v} out of range"))?
            }
        };
        if let (Weights::Tiles(w), None) = (&self.weights, &self.b_zero) {
            return Ok(tvec![self.eval_tiles(w, &inputs, m, a0, &out_shape)?]);
        }
        // AMX always in its own blocks (`columns::run_blocks`; its dequantization rides on the
        // product); rten-gemm in parts of rows where the helper thread takes half (otherwise
        // below, rten-gemm spreading its own blocks).
        let halves = on_helper(m);
        let parts = if halves {
            rows::Parts::Halves
        } else if m >= PARALLEL_MIN_ROWS && threads() > 1 {
            rows::Parts::Pool
        } else {
            rows::Parts::One
        };
        if let Weights::Amx(w) = &self.weights {
            return Ok(tvec![self.eval_columns(w, &inputs, m, a0, &out_shape, parts)?]);
        }
        if halves && matches!(self.weights, Weights::Packed(_)) {
            return Ok(tvec![self.eval_by_rows(&inputs, m, a0, &out_shape, parts)?]);
        }
        let a_ram = a.try_as_plain_ram()?;
        let shifted: Vec<u8>;
        let a_u8: &[u8] = if self.a_signed {
            shifted = a_ram.as_slice::<i8>()?.iter().map(|&v| (v as u8) ^ 0x80).collect();
            &shifted
        } else {
            a_ram.as_slice::<u8>()?
        };
        let mut out = match &self.weights {
            // Zeroed tensors of tract's own (an ndarray handed over would be copied).
            Weights::Gemv(w) => {
                let mut out = Tensor::zero::<i32>(&out_shape)?;
                let mut view = out.try_as_plain_ram_mut()?;
                let sums = view.as_slice_mut::<i32>()?;
                // With 2+ threads: the columns halved with a helper thread that stays awake
                // through the step (split across rayon's pool, a token got slower: 19 → 27 ms,
                // the workers' wake-ups costing more than the second core's bandwidth).
                if threads() > 1 {
                    w.gemm_on_two(a_u8, m, a0, sums);
                } else {
                    w.gemm(a_u8, m, a0, sums);
                }
                drop(view);
                out
            }
            Weights::Tiles(w) => {
                let mut out = Tensor::zero::<i32>(&out_shape)?;
                let mut view = out.try_as_plain_ram_mut()?;
                let sums = view.as_slice_mut::<i32>()?;
                with_threads(m, || w.gemm_tiles(a_u8, m, a0, sums));
                drop(view);
                out
            }
            Weights::Packed(_) | Weights::Amx(_) => {
                // Safety: the buffer is handed to gemm_uninit as MaybeUninit, which writes every
                // element (and returns them as initialized) before anything reads it.
                let mut out = unsafe { Tensor::uninitialized::<i32>(&out_shape)? };
                let len = out.len();
                let ptr = out.as_ptr_mut::<i32>()?.cast::<std::mem::MaybeUninit<i32>>();
                let out_uninit = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                with_threads(m, || rows::product(&self.weights, a_u8, self.k, a0, out_uninit))?;
                out
            }
        };
        let mut view = out.try_as_plain_ram_mut()?;
        let out_data = view.as_slice_mut::<i32>()?;
        if let Some(b_zero) = &self.b_zero {
            rows::subtract_b_zero(out_data, a_u8, self.k, a0, b_zero);
        }
        let Some(dq) = &self.dequantize else { return Ok(tvec![out.into_tvalue()]) };
        let s = inputs.last().context("Int8MatMul: missing row scales")?;
        ensure!(s.len() == m, "Int8MatMul: row scales of shape {:?} for {m} rows", s.shape());
        let s = s.try_as_plain_ram()?;
        let s = s.as_slice::<f32>()?;
        // Safety: `dequantize_rows` writes every row of `y` (`out_data` has all `m`).
        let y = unsafe { written_tensor(&out_shape, |y| dequantize_rows(out_data, s, dq, y))? };
        Ok(tvec![dq.activate_tensor(y)?.into_tvalue()])
    }
}

impl TypedOp for Int8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let a = inputs[0];
        ensure!(a.rank() >= 1 && a.shape[a.rank() - 1] == TDim::from(self.k), "Int8MatMul: input {a:?}, expected last dim {}", self.k);
        let mut shape: TVec<TDim> = a.shape.iter().take(a.rank() - 1).cloned().collect();
        shape.push(self.n.into());
        let dt = if self.dequantize.is_some() { f32::datum_type() } else { i32::datum_type() };
        Ok(tvec![dt.fact(shape)])
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let a = inputs[0];
        let m: TDim = a.shape.iter().take(a.rank() - 1).product();
        Ok(tvec![(Cost::FMA(i32::datum_type()), m * self.k * self.n)])
    }

    as_op!();
}

/// Replaces every int8 product of a decluttered model that rten-gemm can compute exactly
/// (quantized `EinSum`, i32 out, constant right operand, unit scales, scalar left zero point,
/// scalar or per-column right zero point) by an [`Int8MatMul`]. Returns how many it replaced.
/// Run it between tract's `declutter` and `optimize`.
///
/// With `ours`, products whose rows are known at load to be fewer than 16 (apart from
/// symbolic batch and sequence sizes: a decoder step's one row per sequence) run on
/// [`GemvWeights`] where the CPU has AVX-512 VNNI or AVX2, and the others on its tiles
/// where rten-gemm's kernel saturates ([`tiles_available`]); all others on rten-gemm.
pub fn substitute(model: &mut TypedModel, ours: bool) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else { continue };
        let Some(plan) = plan_for(model, node, einsum, ours)? else { continue };
        let mut inputs = vec![node.inputs[0]];
        if plan.a_zero == LeftZero::Input {
            inputs.push(node.inputs[3]);
        }
        let b = node.inputs[1];
        swap_node(model, id, plan, &inputs)?;
        release_weight(model, b, id)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
        super::release_freed_heap();
        let fused = if fold_enabled() { fuse_dequantize(model)? } else { 0 };
        tracing::debug!(products = done, folded = fused, "int8 dequantization folded into the products");
    }
    Ok(done)
}

/// Whether the quantization before the int8 products and the dequantization after them are
/// folded into one op each ([`fuse_dequantize`], `runtime::quantize`); `VITGPT2_INT8_FOLD=0`
/// leaves them to tract's ops (for comparison).
pub fn fold_enabled() -> bool {
    std::env::var("VITGPT2_INT8_FOLD").as_deref() != Ok("0")
}

/// Folds the dequantization that follows an [`Int8MatMul`] into it: `Cast` to f32, `Mul` by the
/// row scales (`[.., 1]`, computed per call) and `Mul` by constant column scales (`[N]`) — our
/// fast layout's `matmul_int8` — and the bias `Add` after them where there is one, and an exact
/// GELU after those (ViT's FC1) where there is one, become its f32 output, computed in the same order with the same roundings (so bit-identical; IEEE
/// products and sums commute), without the intermediate tensors and three or four small ops per
/// product (~300 per decoder step; a trained model's 97 bias adds of the encoder ran alone on
/// one thread, ~20 M values, where the random-init bench bundle's zero biases are dropped by
/// tract). Returns how many were folded.
fn fuse_dequantize(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::{binary::TypedBinOp, cast::Cast, element_wise::ElementWiseOp, math::Add, math::Mul, nn::GeluExact};
    let outputs = model.output_outlets()?.to_vec();
    // The node that alone reads `id`'s only output (not a graph output).
    let only_reader = |model: &TypedModel, id: usize| -> Option<usize> {
        let node = model.node(id);
        (node.outputs.len() == 1 && node.outputs[0].successors.len() == 1 && !outputs.contains(&OutletId::new(id, 0))).then(|| node.outputs[0].successors[0].node)
    };
    // For an f32 `Mul` node taking `x`: its other input.
    let mul_by = |model: &TypedModel, id: usize, x: OutletId| -> Option<OutletId> {
        let node = model.node(id);
        let bin = node.op_as::<TypedBinOp>()?;
        let f32_out = model.outlet_fact(OutletId::new(id, 0)).ok()?.datum_type == f32::datum_type();
        (bin.0.is::<Mul>() && f32_out && node.inputs.len() == 2 && node.inputs.contains(&x)).then(|| if node.inputs[0] == x { node.inputs[1] } else { node.inputs[0] })
    };
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(mm) = model.node(id).op_as::<Int8MatMul>().filter(|mm| mm.dequantize.is_none()) else { continue };
        let Some(cast) = only_reader(model, id).filter(|&c| model.node(c).op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type())) else { continue };
        let Some(m1) = only_reader(model, cast) else { continue };
        let Some(row_scales) = mul_by(model, m1, OutletId::new(cast, 0)) else { continue };
        let Some(m2) = only_reader(model, m1) else { continue };
        let Some(col_scales) = mul_by(model, m2, OutletId::new(m1, 0)) else { continue };
        // Shapes: the scales broadcast along one axis each, and nothing else changes shape.
        let acc = model.outlet_fact(OutletId::new(id, 0))?.shape.to_tvec();
        let rank = acc.len();
        let (rs, cs) = (model.outlet_fact(row_scales)?, model.outlet_fact(col_scales)?);
        let rows_match = rs.datum_type == f32::datum_type() && rs.rank() == rank && rs.shape[rank - 1] == TDim::from(1) && rs.shape.iter().take(rank - 1).eq(acc.iter().take(rank - 1));
        let ws = match &cs.konst {
            Some(t) if t.datum_type() == f32::datum_type() && t.len() == mm.n && t.rank() <= rank && t.shape().last() == Some(&mm.n) => t.clone(),
            _ => continue,
        };
        if !rows_match || model.outlet_fact(OutletId::new(m2, 0))?.shape.to_tvec() != acc {
            continue;
        }
        // And the bias after it, where it is a constant row (`[N]`, `[1, .., N]`).
        let bias = only_reader(model, m2).and_then(|add| {
            let node = model.node(add);
            let bin = node.op_as::<TypedBinOp>()?;
            let x = OutletId::new(m2, 0);
            let other = (bin.0.is::<Add>() && node.inputs.len() == 2 && node.inputs.contains(&x)).then(|| if node.inputs[0] == x { node.inputs[1] } else { node.inputs[0] })?;
            let t = model.outlet_fact(other).ok()?.konst.clone()?;
            let row = t.datum_type() == f32::datum_type() && t.len() == mm.n && t.rank() <= rank && t.shape().last() == Some(&mm.n);
            let out = model.outlet_fact(OutletId::new(add, 0)).ok()?;
            let same_shape = out.datum_type == f32::datum_type() && out.shape.to_tvec() == acc;
            (row && same_shape).then(|| Some((add, t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.into())))?
        });
        let end = bias.as_ref().map_or(m2, |(add, _)| *add);
        // And an exact GELU after that (f32, same shape).
        let gelu = only_reader(model, end).filter(|&g| {
            let node = model.node(g);
            node.op_as::<ElementWiseOp>().is_some_and(|ew| ew.0.is::<GeluExact>() && ew.1.is_none()) && model.outlet_fact(OutletId::new(g, 0)).is_ok_and(|f| f.datum_type == f32::datum_type() && f.shape.to_tvec() == acc)
        });
        let mut fused = mm.clone();
        fused.dequantize = Some(Dequantize { scales: ws.try_as_plain_ram()?.as_slice::<f32>()?.into(), bias: bias.as_ref().map(|(_, b)| Arc::clone(b)), gelu: gelu.is_some() });
        let mut inputs = model.node(id).inputs.clone();
        inputs.push(row_scales);
        swap_node(model, gelu.unwrap_or(end), fused, &inputs)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Empties the constant `b` when product `product`, just swapped out, was its only reader: its
/// bytes live on in the substitute's own layout, and keeping both until `compact` held every
/// weight of the graph twice during the substitution (measured alone: a caption's peak RSS
/// 404 → 399 MB; the larger part of the drop came from reading the file, see `graph` and
/// `onnx_file`). The emptied node has no live reader; `compact` removes it.
fn release_weight(model: &mut TypedModel, b: OutletId, product: usize) -> TractResult<()> {
    let node = model.node(b.node);
    let only_reader = node.outputs.len() == 1 && node.outputs[0].successors.iter().all(|s| s.node == product);
    if node.op_as::<tract_onnx::tract_core::ops::konst::Const>().is_none() || !only_reader || model.output_outlets()?.contains(&b) {
        return Ok(());
    }
    let empty = Arc::new(Tensor::zero::<i8>(&[0])?);
    let node = model.node_mut(b.node);
    node.op = Box::new(tract_onnx::tract_core::ops::konst::Const::new(empty.clone())?);
    node.outputs[0].fact = TypedFact::try_from(empty)?;
    Ok(())
}

/// Whether input `slot`'s only axis is the product's n axis (in b and the output, not in a).
fn on_n_axis(op: &EinSum, slot: usize) -> bool {
    op.axes.iter_all_axes().any(|axis| {
        axis.inputs.get(slot).is_some_and(|p| p.len() == 1) && axis.inputs[0].is_empty() && axis.inputs[1].len() == 1 && axis.outputs[0].len() == 1
    })
}

/// The [`Int8MatMul`] for `node`, if it is a product this module computes exactly.
fn plan_for(model: &TypedModel, node: &TypedNode, op: &EinSum, ours: bool) -> TractResult<Option<Int8MatMul>> {
    let facts = model.node_input_facts(node.id)?;
    if model.outlet_fact(OutletId::new(node.id, 0))?.datum_type != i32::datum_type() || !(facts.len() == 9 || facts.len() == 2) {
        return Ok(None);
    }
    let (a, b) = (facts[0], facts[1]);
    let a_signed = match a.datum_type {
        DatumType::I8 => true,
        DatumType::U8 => false,
        _ => return Ok(None),
    };
    let Some(b_const) = b.konst.clone() else { return Ok(None) };
    if !matches!(b_const.datum_type(), DatumType::I8 | DatumType::U8) {
        return Ok(None);
    }
    // Axes: k in a and b only; n in b and the output only; every other axis of a goes to the
    // output at the same place (and is absent from b or of size 1 there).
    let (ra, rb) = (a.rank(), b.rank());
    let (mut k, mut n) = (None, None);
    for axis in op.axes.iter_all_axes() {
        let (ia, ib, io) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        let b_unit = |ib: &TVec<usize>| ib.is_empty() || (ib.len() == 1 && b_const.shape()[ib[0]] == 1);
        match (ia.len(), ib.len(), io.len()) {
            // An axis of the zero points or scales only.
            (0, 0, 0) => {}
            (1, 1, 0) if k.is_none() => k = Some((ia[0], ib[0])),
            (0, 1, 1) if n.is_none() => n = Some((ib[0], io[0])),
            (1, _, 1) if ia[0] == io[0] && ia[0] + 1 < ra && b_unit(ib) => {}
            (0, 1, 0) if b_unit(ib) => {}
            _ => return Ok(None),
        }
    }
    let (Some((ka, kb)), Some((nb, no))) = (k, n) else { return Ok(None) };
    if ka + 1 != ra || no + 1 != ra {
        return Ok(None);
    }
    let (kd, nd) = (b_const.shape()[kb], b_const.shape()[nb]);
    if kd == 0 || nd == 0 || a.shape[ka] != TDim::from(kd) {
        return Ok(None);
    }
    // Zero points and scales: bias 0, scales 1, output zero point 0.
    let (mut a0, mut b0) = (LeftZero::Const(if a_signed { 128 } else { 0 }), vec![0i32]);
    if facts.len() == 9 {
        let uniform = |ix: usize, want: f64| -> TractResult<bool> {
            Ok(match &facts[ix].konst {
                Some(t) => t.cast_to::<f64>()?.try_as_plain_ram()?.as_slice::<f64>()?.iter().all(|&v| v == want),
                None => false,
            })
        };
        if !(uniform(2, 0.0)? && uniform(4, 1.0)? && uniform(6, 1.0)? && uniform(7, 0.0)? && uniform(8, 1.0)?) {
            return Ok(None);
        }
        a0 = match &facts[3].konst {
            Some(t) => {
                let v = t.cast_to::<i32>()?.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
                let Some(&first) = v.first() else { return Ok(None) };
                let shifted = first + if a_signed { 128 } else { 0 };
                match (v.iter().all(|&x| x == first), u8::try_from(shifted)) {
                    (true, Ok(z)) => LeftZero::Const(z),
                    _ => return Ok(None),
                }
            }
            None if facts[3].shape.volume() == TDim::from(1) && facts[3].datum_type == a.datum_type => LeftZero::Input,
            None => return Ok(None),
        };
        b0 = match &facts[5].konst {
            Some(t) if t.len() == 1 || (t.len() == nd && t.rank() == 1 && on_n_axis(op, 5)) => {
                t.cast_to::<i32>()?.try_as_plain_ram()?.as_slice::<i32>()?.to_vec()
            }
            _ => return Ok(None),
        };
    }
    // The right operand as i8 (u8 shifted by −128, zero points alike), `[K, N]` in strides.
    let b_signed = b_const.datum_type() == DatumType::I8;
    // Borrowed where it is i8 already: a copy of the decoder's 137 MB cost ~0.1 s of load.
    let b_ram = b_const.try_as_plain_ram()?;
    let b_i8: std::borrow::Cow<[i8]> = if b_signed {
        b_ram.as_slice::<i8>()?.into()
    } else {
        b_ram.as_slice::<u8>()?.iter().map(|&v| (v ^ 0x80) as i8).collect::<Vec<_>>().into()
    };
    let b_zero: Vec<i32> = b0.iter().map(|&z| z - if b_signed { 0 } else { 128 }).collect();
    let strides: Vec<usize> = (0..rb).map(|i| b_const.shape()[i + 1..].iter().product()).collect();
    // Rows known at load: the product of a's concrete leading dims (symbols count as 1).
    let known_rows: usize = a.shape.iter().take(ra - 1).filter_map(|d| d.to_usize().ok()).product();
    let weights = if ours && known_rows < PARALLEL_MIN_ROWS && int8_gemv::available() {
        Weights::Gemv(Arc::new(GemvWeights::new(kd, nd, &b_i8, strides[kb], strides[nb])))
    } else if ours && tiles_available() {
        let w = GemvWeights::new(kd, nd, &b_i8, strides[kb], strides[nb]);
        // In 16-column panels (the encoder's products 4–6 % faster stand-alone, README
        // "Performance"); `VITGPT2_TILE_PANELS=0` keeps the group layout, to compare.
        Weights::Tiles(Arc::new(if std::env::var("VITGPT2_TILE_PANELS").as_deref() == Ok("0") { w } else { w.into_panels() }))
    } else if ours && amx::available() && AmxWeights::fits(kd, nd) {
        Weights::Amx(Arc::new(AmxWeights::new(kd, nd, &b_i8, strides[kb], strides[nb])))
    } else {
        let b_view: Matrix<i8> = NdTensorView::from_data_with_strides([kd, nd], &b_i8[..], [strides[kb], strides[nb]])
            .map_err(|e| format_err!("Int8MatMul: right operand layout: {e:?}"))?;
        Weights::Packed(Arc::new(executor().prepack_b(b_view)))
    };
    let b_zero = if b_zero.iter().all(|&z| z == 0) {
        None
    } else if b_zero.len() == 1 {
        Some(vec![b_zero[0]; nd].into())
    } else {
        Some(b_zero.into())
    };
    Ok(Some(Int8MatMul { weights, k: kd, n: nd, b_zero, a_signed, a_zero: a0, dequantize: None }))
}
