//! A model bundle: a directory in the Hugging Face layout (config.json,
//! generation_config.json, preprocessor_config.json, tokenizer) plus ONNX graphs, in the
//! bundle root or in `onnx/`. Opening checks that every file is there and that they belong
//! together; the graphs themselves are loaded by [`crate::runtime`].

pub mod contract;

use std::path::{Path, PathBuf};

use crate::assets::{ModelAssets, Origin};
use crate::error::{Error, Result};
use contract::graph;

/// Which weights to run when a bundle holds both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// int8 graphs if the bundle has them, else fp32.
    #[default]
    Auto,
    Fp32,
    Int8,
}

word_enum!(Precision { Auto = "auto", Fp32 = "fp32", Int8 = "int8" });

/// The ONNX graphs of a bundle, by layout.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphFiles {
    /// Optimum's `image-to-text-with-past` export.
    Optimum { encoder: PathBuf, decoder: PathBuf, decoder_with_past: PathBuf, quantized: bool },
    /// The project's fast layout (`vitgpt2-host export`): `encoder_fast` also emits every
    /// layer's cross-attention keys/values; `decoder_step` takes them with the self-attention
    /// cache. Preferred when a bundle has it.
    Fast { encoder: PathBuf, decoder_step: PathBuf, quantized: bool },
}

impl GraphFiles {
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            GraphFiles::Optimum { encoder, decoder, decoder_with_past, .. } => vec![encoder, decoder, decoder_with_past],
            GraphFiles::Fast { encoder, decoder_step, .. } => vec![encoder, decoder_step],
        }
    }
    pub fn quantized(&self) -> bool {
        match self {
            GraphFiles::Optimum { quantized, .. } => *quantized,
            GraphFiles::Fast { quantized, .. } => *quantized,
        }
    }
}

/// A bundle's checked assets and the graph files chosen to run.
pub struct Bundle {
    pub assets: ModelAssets,
    pub graphs: GraphFiles,
}

impl Bundle {
    /// Opens and cross-checks the bundle's assets and picks its graphs for `precision`.
    /// Errors: [`Error::Bundle`] naming the file and the problem.
    pub fn open(dir: &Path, precision: Precision) -> Result<Self> {
        let assets = ModelAssets::open(dir, Origin::Bundle)?;
        let graphs = find_graphs(dir, precision)?;
        Ok(Bundle { assets, graphs })
    }

    pub fn dir(&self) -> &Path {
        &self.assets.dir
    }
}

/// `name.onnx` in the bundle root, or in `onnx/` as transformers.js bundles have it.
fn find(dir: &Path, file: &str) -> Option<PathBuf> {
    [dir.join(file), dir.join(contract::ONNX_DIR).join(file)].into_iter().find(|p| p.is_file())
}

fn find_set(dir: &Path, suffix: &str) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for g in graph::OPTIMUM {
        let file = graph::file(g, suffix);
        match find(dir, &file) {
            Some(p) => found.push(p),
            None => missing.push(file),
        }
    }
    (found, missing)
}

/// The fast layout's graphs, if both are there.
fn find_fast(dir: &Path, quantized: bool) -> Option<GraphFiles> {
    let suffix = if quantized { graph::FAST_INT8 } else { graph::FP32 };
    let encoder = find(dir, &graph::file(graph::ENCODER_FAST, suffix))?;
    let decoder_step = find(dir, &graph::file(graph::DECODER_STEP, suffix))?;
    Some(GraphFiles::Fast { encoder, decoder_step, quantized })
}

fn find_graphs(dir: &Path, precision: Precision) -> Result<GraphFiles> {
    // The fast layout wins over Optimum's at the same precision.
    let fast = match precision {
        Precision::Int8 => find_fast(dir, true),
        Precision::Fp32 => find_fast(dir, false),
        Precision::Auto => find_fast(dir, true).or_else(|| {
            // fp32 fast graphs only when the bundle has no int8 Optimum set either.
            if find_set(dir, graph::OPTIMUM_INT8).1.is_empty() {
                None
            } else {
                find_fast(dir, false)
            }
        }),
    };
    if let Some(f) = fast {
        return Ok(f);
    }
    let (int8, int8_missing) = find_set(dir, graph::OPTIMUM_INT8);
    let (fp32, fp32_missing) = find_set(dir, graph::FP32);
    let pick = |files: Vec<PathBuf>, quantized: bool| GraphFiles::Optimum {
        encoder: files[0].clone(),
        decoder: files[1].clone(),
        decoder_with_past: files[2].clone(),
        quantized,
    };
    let explain = |missing: &[String]| {
        Error::bundle(
            dir.join(&missing[0]),
            format!("missing graph(s) {missing:?} (looked in the bundle and its onnx/ folder; an Optimum image-to-text-with-past export has encoder_model, decoder_model and decoder_with_past_model)"),
        )
    };
    match precision {
        Precision::Int8 if int8_missing.is_empty() => Ok(pick(int8, true)),
        Precision::Int8 => Err(explain(&int8_missing)),
        Precision::Fp32 if fp32_missing.is_empty() => Ok(pick(fp32, false)),
        Precision::Fp32 => Err(explain(&fp32_missing)),
        Precision::Auto if int8_missing.is_empty() => Ok(pick(int8, true)),
        Precision::Auto if fp32_missing.is_empty() => Ok(pick(fp32, false)),
        // Report the set that is closest to complete.
        Precision::Auto if int8_missing.len() < fp32_missing.len() => Err(explain(&int8_missing)),
        Precision::Auto => Err(explain(&fp32_missing)),
    }
}
