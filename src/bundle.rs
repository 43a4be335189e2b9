//! A model bundle: a directory in the Hugging Face layout (config.json,
//! generation_config.json, preprocessor_config.json, tokenizer) plus ONNX graphs.
//! Loading checks that every file is there and that they belong together.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::preprocess::PreprocessConfig;
use crate::tokenizer::CaptionTokenizer;

/// Which weights to run when a bundle holds both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// int8 graphs if the bundle has them, else fp32.
    #[default]
    Auto,
    Fp32,
    Int8,
}

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

pub struct Bundle {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    pub preprocess: PreprocessConfig,
    pub tokenizer: CaptionTokenizer,
    pub graphs: GraphFiles,
}

const OPTIMUM_GRAPHS: [&str; 3] = ["encoder_model", "decoder_model", "decoder_with_past_model"];

impl Bundle {
    /// Reads and cross-checks the bundle's configuration files and finds its graphs (the
    /// graphs themselves are loaded by the runtime).
    pub fn open(dir: &Path, precision: Precision) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::bundle(dir, "not a directory; pass the model bundle's folder (e.g. models/synthetic-fr)"));
        }
        let config = ModelConfig::from_file(&required(dir, "config.json")?)?;
        let generation = GenerationConfig::from_bundle(&dir.join("generation_config.json"), &config)?;
        let preprocess = PreprocessConfig::from_file(&required(dir, "preprocessor_config.json")?)?;
        let mut special = vec![generation.decoder_start_token_id, generation.pad_token_id];
        special.extend(generation.eos_token_ids.iter().copied());
        let tokenizer = CaptionTokenizer::from_dir(dir, &special)?;
        let vocab = config.decoder.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(Error::bundle(
                tokenizer.source(),
                format!(
                    "tokenizer has {} tokens but config.json's decoder.vocab_size is {vocab}: tokenizer and model do not belong together",
                    tokenizer.vocab_size()
                ),
            ));
        }
        if tokenizer.vocab_size() < vocab {
            tracing::warn!(tokenizer = tokenizer.vocab_size(), model = vocab, "model vocabulary is larger than the tokenizer's (padded embedding?)");
        }
        for id in std::iter::once(generation.decoder_start_token_id).chain(generation.eos_token_ids.iter().copied()) {
            if id as usize >= vocab {
                return Err(Error::bundle(dir.join("generation_config.json"), format!("token id {id} is outside the vocabulary ({vocab})")));
            }
        }
        let graphs = find_graphs(dir, precision)?;
        Ok(Bundle { dir: dir.to_path_buf(), config, generation, preprocess, tokenizer, graphs })
    }
}

fn required(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::bundle(p, "missing file (a bundle needs config.json, preprocessor_config.json, a tokenizer and ONNX graphs)"))
    }
}

/// `name.onnx` in the bundle root, or in `onnx/` as transformers.js bundles have it.
fn find(dir: &Path, file: &str) -> Option<PathBuf> {
    [dir.join(file), dir.join("onnx").join(file)].into_iter().find(|p| p.is_file())
}

fn find_set(dir: &Path, suffix: &str) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for g in OPTIMUM_GRAPHS {
        let file = format!("{g}{suffix}.onnx");
        match find(dir, &file) {
            Some(p) => found.push(p),
            None => missing.push(file),
        }
    }
    (found, missing)
}

/// File names of the fast layout: `encoder_fast{suffix}.onnx`, `decoder_step{suffix}.onnx`.
pub const FAST_GRAPHS: [&str; 2] = ["encoder_fast", "decoder_step"];

/// The fast layout's graphs, if both are there.
fn find_fast(dir: &Path, quantized: bool) -> Option<GraphFiles> {
    let suffix = if quantized { "_int8" } else { "" };
    let encoder = find(dir, &format!("{}{suffix}.onnx", FAST_GRAPHS[0]))?;
    let decoder_step = find(dir, &format!("{}{suffix}.onnx", FAST_GRAPHS[1]))?;
    Some(GraphFiles::Fast { encoder, decoder_step, quantized })
}

fn find_graphs(dir: &Path, precision: Precision) -> Result<GraphFiles> {
    // The fast layout wins over Optimum's at the same precision.
    let fast = match precision {
        Precision::Int8 => find_fast(dir, true),
        Precision::Fp32 => find_fast(dir, false),
        Precision::Auto => find_fast(dir, true).or_else(|| {
            // fp32 fast graphs only when the bundle has no int8 Optimum set either.
            if find_set(dir, "_quantized").1.is_empty() {
                None
            } else {
                find_fast(dir, false)
            }
        }),
    };
    if let Some(f) = fast {
        return Ok(f);
    }
    let (int8, int8_missing) = find_set(dir, "_quantized");
    let (fp32, fp32_missing) = find_set(dir, "");
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
