//! The device runtime: a bundle's ONNX graphs in tract, optimized once at load. Two layouts
//! implement [`Engine`]: Optimum's (encoder, decoder, decoder-with-past; [`optimum`]) and the
//! project's fast layout ([`fast`], written by `vitgpt2-host export`), which a bundle prefers
//! when it has both. [`open`] gives the [`Captioner`] every device command uses.

pub mod fast;
pub mod graph;
pub mod optimum;

use std::path::Path;
use std::time::Instant;

use ndarray::Axis;
use tract_onnx::prelude::*;

use crate::bundle::{Bundle, GraphFiles, Precision};
use crate::captioner::Captioner;
use crate::engine::Engine;
use crate::error::{chain, Error, Result};

pub use fast::FastRuntime;
pub use graph::Graph;
pub use optimum::OptimumRuntime;

/// How to load a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub precision: Precision,
    /// Threads for tract's matrix products (0 or 1: single-threaded).
    pub threads: usize,
}

/// How many threads tract's matrix products use; 1 keeps tract single-threaded (its default).
pub fn set_threads(threads: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if threads > 1 {
        set_default_executor(Executor::multithread(threads));
    } else {
        set_default_executor(Executor::SingleThread);
    }
}

/// Loads the engine for the bundle's graph layout.
pub fn load(bundle: &Bundle) -> Result<Box<dyn Engine>> {
    let dtype = if bundle.graphs.quantized() { "int8" } else { "fp32" };
    match &bundle.graphs {
        GraphFiles::Optimum { encoder, decoder, decoder_with_past, .. } => {
            Ok(Box::new(OptimumRuntime::load(&bundle.assets, encoder, decoder, decoder_with_past, dtype)?))
        }
        GraphFiles::Fast { encoder, decoder_step, .. } => Ok(Box::new(FastRuntime::load(&bundle.assets, encoder, decoder_step, dtype)?)),
    }
}

/// Opens the bundle in `dir` and loads its graphs: the captioner of `vitgpt2-node caption`,
/// `run` and `bench`. Errors: [`Error::Bundle`] naming the file and the problem.
pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Captioner> {
    let t0 = Instant::now();
    set_threads(opts.threads);
    let bundle = Bundle::open(dir, opts.precision)?;
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
