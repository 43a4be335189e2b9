//! The device runtime: a bundle's ONNX graphs in tract, optimized once at load. Two layouts
//! implement [`Engine`]: Optimum's (encoder, decoder, decoder-with-past; [`optimum`]) and the
//! project's fast layout ([`fast`], written by `vitgpt2-host export`), which a bundle prefers
//! when it has both. [`open`] gives the [`Captioner`] every device command uses.

pub mod amx;
pub mod f32_ops;
pub mod fast;
pub mod graph;
pub mod helper_thread;
pub mod int8;
pub mod int8_gemv;
pub mod onnx_file;
pub mod optimum;
pub mod quantize;
pub mod raw_data;
pub mod weight_memory;

use std::path::Path;
use std::time::Instant;

use ndarray::Axis;
use tract_onnx::prelude::*;

use crate::bundle::{dtypes_present, Bundle, DtypeChoice, GraphLayout, GraphSet};
use crate::captioner::Captioner;
use crate::engine::Engine;
use crate::error::{chain, Error, Result};

pub use fast::FastRuntime;
pub use graph::Graph;
pub use onnx_file::OnnxFile;
pub use optimum::{DecoderFiles, OptimumRuntime};

/// Turns off the backtraces that errors (tract's, through `anyhow`) capture when
/// `RUST_BACKTRACE` is set, unless `RUST_LIB_BACKTRACE` is set too; panics keep theirs (Rust
/// reads `RUST_LIB_BACKTRACE` before `RUST_BACKTRACE` for library backtraces, std::backtrace).
/// tract's optimizer uses errors as answers (a constant tested for a neutral element that is
/// not one), so with `RUST_BACKTRACE=1` a load captured thousands of backtraces nobody prints:
/// declutter +60–100 ms on the full-size int8 bundle (measured, README "Performance"). Call
/// at the start of `main`, before any thread starts.
pub fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// How to load a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Which weight form to run (`--dtype`; `--precision` maps onto it).
    pub dtype: DtypeChoice,
    /// Only this layout (`None`: the best the bundle has).
    pub layout: Option<GraphLayout>,
    /// Threads for tract's matrix products (0 or 1: single-threaded).
    pub threads: usize,
}

/// How many threads the matrix products use (tract's and the int8 ones on rten-gemm, see
/// [`int8::set_threads`]); 1 keeps them single-threaded (tract's default).
pub fn set_threads(threads: usize) {
    use tract_linalg::multithread::{current_threading_element_threshold, set_default_executor, set_threading_element_threshold, Executor};
    static TRACTS_THRESHOLD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let tracts_threshold = *TRACTS_THRESHOLD.get_or_init(current_threading_element_threshold);
    int8::set_threads(threads);
    // With 2 threads our ops split on the helper thread; tract's own element-wise ones (residual
    // adds, layer norms, reductions) through rayon's pool were slower than on one thread, its
    // workers sleeping between ops, so they stay on one (README "Performance"). Its matrix
    // products (an fp32 graph's) still split across the pool.
    set_threading_element_threshold(if int8::helper_takes(threads) { usize::MAX } else { tracts_threshold });
    if threads > 1 {
        set_default_executor(int8::thread_pool(threads).map_or_else(|| Executor::multithread(threads), Executor::MultiThread));
    } else {
        set_default_executor(Executor::SingleThread);
    }
}

/// Loads the first of the bundle's graph sets that this node can run (a set that uses an operator
/// tract lacks is skipped and logged). When none is left, the error names the file, the operator
/// and the dtypes of this bundle that do run.
pub fn load(bundle: &Bundle) -> Result<Box<dyn Engine>> {
    let _heap = LoadHeap::enter();
    let mut refused: Option<Error> = None;
    for set in &bundle.candidates {
        let files = set.files.iter().map(|p| OnnxFile::open(p)).collect::<Result<Vec<_>>>()?;
        let outcome = match files.iter().map(|f| (f, f.unsupported_ops())).find(|(_, ops)| !ops.is_empty()) {
            Some((file, ops)) => Err(Error::Unsupported {
                path: file.path.clone(),
                msg: format!("uses operator(s) {} that this node cannot run", ops.join(", ")),
            }),
            None => load_set(bundle, set, files),
        };
        match outcome {
            Err(e @ Error::Unsupported { .. }) => {
                tracing::info!(dtype = set.dtype.word(), layout = set.layout.word(), "graph set skipped: {e}");
                refused.get_or_insert(e);
            }
            Ok(engine) => {
                release_freed_heap();
                return Ok(engine);
            }
            other => return other,
        }
    }
    let Some(Error::Unsupported { path, msg }) = refused else {
        return Err(Error::bundle(bundle.dir(), "no graph set to load"));
    };
    let runnable: Vec<&str> = dtypes_present(bundle.dir()).into_iter().filter(|d| runs(bundle, d)).collect();
    let hint = match runnable.first() {
        Some(first) => format!("this bundle's {} graphs do: pass --dtype {first}", runnable.join(", ")),
        None => "no graph set of this bundle runs here".to_string(),
    };
    Err(Error::Unsupported { path, msg: format!("{msg}; {hint}") })
}

/// Hands the heap that loading freed (protobufs, tract's intermediate models, weights before
/// their layouts) back to the kernel; glibc keeps it otherwise. Called after each graph loads
/// and after the engine: measured on the full-size int8 bundle, a caption's peak RSS 437 → 405
/// MiB (graphs loaded one after the other; 518 → 500 MiB in parallel).
pub(crate) fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: malloc_trim only returns free pages to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether [`load`] sets glibc's malloc thresholds around a load (see [`LoadHeap`]); off until
/// [`manage_load_heap`] turns it on.
static LOAD_HEAP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets [`load`] set glibc's malloc thresholds around each load ([`LoadHeap`]): for a process
/// whose allocator nobody else tunes — `vitgpt2-node` calls it at the start of `main`; the host
/// binary sets its own (`train::setup::configure_allocator`). Nothing happens where the
/// environment already sets them (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_TOP_PAD_`, or malloc tunables in `GLIBC_TUNABLES`).
pub fn manage_load_heap() {
    let preset = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].iter().any(|v| std::env::var_os(v).is_some())
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
    LOAD_HEAP.store(!preset, std::sync::atomic::Ordering::Relaxed);
}

/// glibc's malloc while graphs load: every block of 256 KiB or more its own memory map, handed
/// back to the kernel when freed. By default glibc raises that threshold to the largest mapped
/// block freed so far (up to 32 MiB), then keeps later blocks in its heaps — one per thread —
/// until trimmed: two graphs loading on two threads (`fast::parallel_load`) then peaked at
/// 344–372 MiB against 322–327 with the same 1 MiB threshold set through `GLIBC_TUNABLES`
/// (full-size int8 bundle, `bench` peak RSS, four interleaved pairs; 326–331 MiB in four runs
/// with this guard). 256 KiB rather than 1 MiB since the laid-out int8 weights left the heap
/// (`weight_memory`): a 768 × 768 matrix's tract copy (576 KiB) freed on the heap was no longer
/// reused by the next laid-out matrix, and the load peaked at 345–358 MiB; at 256 KiB, 318–324
/// (three interleaved pairs, no change in load time). Afterwards 32 MiB, trim at 64 MiB: at or above anything glibc's own
/// adjustment reaches, so a caption's buffers stay on the heap from one caption to the next
/// instead of being mapped and faulted in afresh (all mapped, the encoder ran 1.6× slower; 4 and
/// 8 MiB still added ~50–100 k page faults to a `bench` run; with these, as many as before).
struct LoadHeap {
    on: bool,
}

impl LoadHeap {
    fn enter() -> Self {
        let on = LOAD_HEAP.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if on {
            // Safety: mallopt only sets malloc's parameters; it takes no pointers.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
            }
        }
        LoadHeap { on }
    }
}

impl Drop for LoadHeap {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if self.on {
            // Safety: as in `enter`.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
            }
        }
    }
}

/// Whether some complete graph set of dtype `word` has only operators tract registers (a hint:
/// loading it may still fail).
fn runs(bundle: &Bundle, word: &str) -> bool {
    let Ok(choice) = word.parse::<DtypeChoice>() else { return false };
    let Ok(b) = Bundle::open(bundle.dir(), choice, None) else { return false };
    b.candidates.iter().any(|set| set.files.iter().all(|p| OnnxFile::read(p).map(|f| f.unsupported_ops().is_empty()).unwrap_or(false)))
}

fn load_set(bundle: &Bundle, set: &GraphSet, mut files: Vec<OnnxFile>) -> Result<Box<dyn Engine>> {
    let assets = &bundle.assets;
    if assets.config.decoder.cross_attention_causal {
        // Every layout lists its encoder first.
        files.iter().skip(1).try_for_each(check_causal_cross_attention)?;
    }
    Ok(match (set.layout, files.len()) {
        (GraphLayout::Fast, 2) => {
            let dec = files.remove(1);
            Box::new(FastRuntime::load(assets, files.remove(0), dec, set.dtype)?)
        }
        (GraphLayout::Optimum, 3) => {
            let decoder_with_past = files.remove(2);
            let decoder = files.remove(1);
            Box::new(OptimumRuntime::load(assets, files.remove(0), DecoderFiles::Split { decoder, decoder_with_past }, set.dtype)?)
        }
        (GraphLayout::OptimumMerged, 2) => {
            let merged = files.remove(1);
            Box::new(OptimumRuntime::load(assets, files.remove(0), DecoderFiles::Merged(merged), set.dtype)?)
        }
        (layout, n) => return Err(Error::bundle(bundle.dir(), format!("{n} graph files for the {} layout", layout.word()))),
    })
}

/// A model whose config.json sets `decoder.cross_attention_causal` (the original ViT-GPT2) needs
/// decoder graphs that apply that mask, which `vitgpt2-host export` marks in their metadata; any
/// other decoder (e.g. exported by Optimum from a converted checkpoint) would caption differently.
fn check_causal_cross_attention(file: &OnnxFile) -> Result<()> {
    use crate::bundle::contract::metadata;
    let marked = file.proto.metadata_props.iter().any(|p| p.key == metadata::CROSS_ATTENTION && p.value == metadata::CAUSAL_OVER_IMAGE_TOKENS);
    if marked {
        return Ok(());
    }
    Err(Error::bundle(
        &file.path,
        "config.json sets decoder.cross_attention_causal (the original ViT-GPT2's cross-attention) but this decoder graph does not apply it: re-export the checkpoint with vitgpt2-host export",
    ))
}

/// Opens the bundle in `dir` and loads its graphs: the captioner of `vitgpt2-node caption`,
/// `run` and `bench`. Errors: [`Error::Bundle`] naming the file and the problem.
pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Captioner> {
    let t0 = Instant::now();
    set_threads(opts.threads);
    let bundle = Bundle::open(dir, opts.dtype, opts.layout)?;
    let engine = load(&bundle)?;
    tracing::info!(model = %dir.display(), graphs = %engine.describe(), "model loaded");
    Ok(Captioner::new(bundle.assets, engine, t0.elapsed().as_secs_f64() * 1e3))
}

/// `[rows, 1]` token ids of `dtype`.
fn ids_tensor(dtype: DatumType, tokens: &[u32]) -> Result<TValue> {
    let t = Tensor::from_shape(&[tokens.len(), 1], &tokens.iter().map(|&t| t as i64).collect::<Vec<_>>())
        .and_then(|t| t.cast_to_dt(dtype).map(|c| c.into_owned()))
        .map_err(|e| Error::runtime("decoder", chain(&e)))?;
    Ok(t.into_tvalue())
}

/// Gathers rows of a tensor along its first axis (beam reordering, broadcasting one image).
fn gather_rows(stage: &str, t: &TValue, rows: &[usize]) -> Result<TValue> {
    let view = t.to_plain_array_view::<f32>().map_err(|e| Error::runtime(stage, chain(&e)))?;
    Ok(view.select(Axis(0), rows).into_tensor().into_tvalue())
}

/// Whether `rows` keeps every one of `n` rows in place.
fn is_identity(rows: &[usize], n: usize) -> bool {
    rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r)
}
