//! A model bundle: a directory in the Hugging Face layout (config.json,
//! generation_config.json, preprocessor_config.json, tokenizer) plus ONNX graphs, in the bundle
//! root or in `onnx/` (as transformers.js repositories keep them). Opening checks that the
//! assets belong together and lists the complete graph sets, best first; the graphs themselves
//! are loaded by [`crate::runtime`], which takes the first set it can run.

pub mod contract;

use std::path::{Path, PathBuf};

use crate::assets::{ModelAssets, Origin};
use crate::error::{Error, Result};
use contract::graph;

/// A weight form, named and suffixed as transformers.js names its `dtype`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Fp32,
    /// Half-precision weights (widened to f32 at load).
    Fp16,
    /// 8-bit integer products (`_quantized`): onnxruntime's `quantize_dynamic` as transformers.js
    /// converts models (unsigned weights for graphs with a Conv, signed otherwise).
    Q8,
    /// 8-bit, signed weights (`_int8`; in the fast layout, the project's own int8 form).
    Int8,
    /// 8-bit, unsigned weights (`_uint8`).
    Uint8,
    /// 4-bit blocks (`MatMulNBits`).
    Q4,
    Q4f16,
    Bnb4,
}
word_enum!(Dtype { Fp32 = "fp32", Fp16 = "fp16", Q8 = "q8", Int8 = "int8", Uint8 = "uint8", Q4 = "q4", Q4f16 = "q4f16", Bnb4 = "bnb4" });

impl Dtype {
    pub const ALL: [Dtype; 8] = [Dtype::Fp32, Dtype::Fp16, Dtype::Q8, Dtype::Int8, Dtype::Uint8, Dtype::Q4, Dtype::Q4f16, Dtype::Bnb4];

    /// The file-name suffix of this form (transformers.js's).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Fp32 => graph::FP32,
            Dtype::Fp16 => "_fp16",
            Dtype::Q8 => graph::OPTIMUM_INT8,
            Dtype::Int8 => graph::FAST_INT8,
            Dtype::Uint8 => "_uint8",
            Dtype::Q4 => "_q4",
            Dtype::Q4f16 => "_q4f16",
            Dtype::Bnb4 => "_bnb4",
        }
    }

    /// Integer products on 8-bit weights.
    pub fn is_8bit(self) -> bool {
        matches!(self, Dtype::Q8 | Dtype::Int8 | Dtype::Uint8)
    }
}

/// Which graphs to run (`--dtype`, `model.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// The fastest form the bundle has that the node runs: 8-bit first (the fast layout's own
    /// int8, then q8, int8, uint8), then fp32, fp16, the 4-bit forms.
    #[default]
    Auto,
    /// Any 8-bit form, in `Auto`'s order (`--precision int8`).
    Any8bit,
    Exactly(Dtype),
}

impl std::str::FromStr for DtypeChoice {
    type Err = Error;
    /// Errors: [`Error::Invalid`] listing `auto` and the dtypes.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DtypeChoice::Auto),
            other => other
                .parse::<Dtype>()
                .map(DtypeChoice::Exactly)
                .map_err(|e| Error::Invalid(e.to_string().replace("`: use ", "`: use auto, "))),
        }
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DtypeChoice::Auto => f.write_str("auto"),
            DtypeChoice::Any8bit => f.write_str("any 8-bit"),
            DtypeChoice::Exactly(d) => f.write_str(d.word()),
        }
    }
}

/// The older `--precision` flag: `auto`, `fp32`, or `int8` meaning any 8-bit form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Auto,
    Fp32,
    Int8,
}
word_enum!(Precision { Auto = "auto", Fp32 = "fp32", Int8 = "int8" });

impl From<Precision> for DtypeChoice {
    fn from(p: Precision) -> Self {
        match p {
            Precision::Auto => DtypeChoice::Auto,
            Precision::Fp32 => DtypeChoice::Exactly(Dtype::Fp32),
            Precision::Int8 => DtypeChoice::Any8bit,
        }
    }
}

/// How a bundle's graphs are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphLayout {
    /// The project's fast layout (`vitgpt2-host export`): `encoder_fast` also emits every
    /// layer's cross-attention keys/values; `decoder_step` takes them with the self-attention cache.
    Fast,
    /// Optimum's `image-to-text-with-past` export: encoder, decoder, decoder-with-past.
    Optimum,
    /// Optimum's default export (and transformers.js's): encoder and one merged decoder.
    OptimumMerged,
}
word_enum!(GraphLayout { Fast = "fast", Optimum = "optimum", OptimumMerged = "optimum-merged" });

impl GraphLayout {
    /// The graph stems of this layout, in load order.
    pub fn stems(self) -> &'static [&'static str] {
        match self {
            GraphLayout::Fast => &graph::FAST,
            GraphLayout::Optimum => &graph::OPTIMUM,
            GraphLayout::OptimumMerged => &[graph::ENCODER_MODEL, graph::DECODER_MERGED],
        }
    }
}

/// One complete set of graphs: a layout in one weight form.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphSet {
    pub layout: GraphLayout,
    pub dtype: Dtype,
    /// In [`GraphLayout::stems`] order.
    pub files: Vec<PathBuf>,
}

/// A bundle's checked assets and the graph sets it could run, best first.
pub struct Bundle {
    pub assets: ModelAssets,
    pub candidates: Vec<GraphSet>,
}

/// The order `auto` tries graph sets in: fastest first (tract's integer products beat its f32
/// ones at full size; the fast layout needs fewer ops per token than Optimum's), split Optimum
/// graphs before a merged decoder (no `If` to specialize).
const AUTO_ORDER: &[(GraphLayout, Dtype)] = {
    use Dtype::*;
    use GraphLayout::*;
    &[
        (Fast, Int8),
        (Optimum, Q8),
        (OptimumMerged, Q8),
        (Optimum, Int8),
        (OptimumMerged, Int8),
        (Optimum, Uint8),
        (OptimumMerged, Uint8),
        (Fast, Fp32),
        (Optimum, Fp32),
        (OptimumMerged, Fp32),
        (Optimum, Fp16),
        (OptimumMerged, Fp16),
        (Optimum, Q4),
        (OptimumMerged, Q4),
        (Optimum, Q4f16),
        (OptimumMerged, Q4f16),
        (Optimum, Bnb4),
        (OptimumMerged, Bnb4),
    ]
};

impl Bundle {
    /// Opens and cross-checks the bundle's assets and lists its complete graph sets that match
    /// `choice` (and `layout`, when given), best first. Errors: [`Error::Bundle`] naming the file
    /// and the problem — for missing graphs, the set closest to complete.
    pub fn open(dir: &Path, choice: DtypeChoice, layout: Option<GraphLayout>) -> Result<Self> {
        let assets = ModelAssets::open(dir, Origin::Bundle)?;
        let order: Vec<(GraphLayout, Dtype)> = AUTO_ORDER
            .iter()
            .copied()
            .filter(|&(l, _)| layout.is_none_or(|want| want == l))
            .filter(|&(_, d)| match choice {
                DtypeChoice::Auto => true,
                DtypeChoice::Any8bit => d.is_8bit(),
                DtypeChoice::Exactly(want) => d == want,
            })
            .collect();
        let mut candidates = Vec::new();
        let mut closest: Option<Vec<String>> = None;
        for &(l, d) in &order {
            let (files, missing) = find_set(dir, l, d);
            if missing.is_empty() {
                candidates.push(GraphSet { layout: l, dtype: d, files });
            } else if !files.is_empty() && closest.as_ref().is_none_or(|c| missing.len() < c.len()) {
                closest = Some(missing);
            }
        }
        if candidates.is_empty() {
            // No set at all: name what the usual set of the requested form would need.
            let missing = closest.unwrap_or_else(|| {
                let (l, d) = order
                    .iter()
                    .copied()
                    .find(|&(l, _)| l == GraphLayout::Optimum)
                    .or(order.first().copied())
                    .unwrap_or((GraphLayout::Optimum, Dtype::Fp32));
                find_set(dir, l, d).1
            });
            let have = dtypes_present(dir);
            let first = missing.first().cloned().unwrap_or_else(|| "graphs".into());
            return Err(Error::bundle(
                dir.join(&first),
                format!(
                    "missing graph(s) {missing:?} for --dtype {choice} (looked in the bundle and its onnx/ folder; an Optimum image-to-text-with-past export has encoder_model, decoder_model and decoder_with_past_model, or decoder_model_merged){}",
                    if have.is_empty() { String::new() } else { format!("; this bundle has: {}", have.join(", ")) }
                ),
            ));
        }
        Ok(Bundle { assets, candidates })
    }

    pub fn dir(&self) -> &Path {
        &self.assets.dir
    }
}

/// `name` in the bundle root, or in `onnx/` as transformers.js bundles have it.
fn find(dir: &Path, file: &str) -> Option<PathBuf> {
    [dir.join(file), dir.join(contract::ONNX_DIR).join(file)].into_iter().find(|p| p.is_file())
}

/// The files of `layout` in form `dtype` that exist, and the names of those that do not.
fn find_set(dir: &Path, layout: GraphLayout, dtype: Dtype) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for stem in layout.stems() {
        let file = graph::file(stem, dtype.suffix());
        match find(dir, &file) {
            Some(p) => found.push(p),
            None => missing.push(file),
        }
    }
    (found, missing)
}

/// The dtypes of which the bundle has at least one complete graph set, in `auto` order.
pub fn dtypes_present(dir: &Path) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for &(l, d) in AUTO_ORDER {
        if find_set(dir, l, d).1.is_empty() && !out.contains(&d.word()) {
            out.push(d.word());
        }
    }
    out
}
