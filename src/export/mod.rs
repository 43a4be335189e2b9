//! ONNX export of the candle model into a device bundle (`vitgpt2-host export`).
//!
//! candle has no ONNX export, so the graphs are written here with tract-onnx's prost types
//! ([`onnx`]). Layouts: the project's fast layout ([`fast`]: an encoder that also emits every
//! layer's cross-attention keys/values, and one decoder-step graph). Weights fp32 or int8
//! (per output channel, symmetric; LayerNorm, Softmax, GELU and the residual stream stay f32).

pub mod fast;
pub mod onnx;
pub mod optimum;
pub mod pipeline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::bundle::contract::{self, graph};
use crate::assets::{ModelAssets, Origin};
use crate::config::{Gpt2Config, ModelConfig, VitConfig};
use crate::preprocess::{ImageSize, PreprocessConfig};
use crate::error::{write_atomic, write_json, Error, Result};
use crate::model::VisionEncoderDecoder;
pub use fast::WeightForm;

/// Every parameter of the model as f32 on the CPU, by Hugging Face name (`default()`: none).
#[derive(Default)]
pub struct Weights {
    map: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    pub fn from_model(model: &VisionEncoderDecoder) -> Result<Self> {
        let mut map = HashMap::new();
        for (name, var) in model.params() {
            let t = var.as_tensor();
            let dims = t.dims().to_vec();
            let data: Vec<f32> = t
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(|e| Error::setting("export", format!("{name}: {e}")))?;
            map.insert(name.clone(), (dims, data));
        }
        Ok(Weights { map })
    }

    pub fn get(&self, name: &str) -> Result<&(Vec<usize>, Vec<f32>)> {
        self.map.get(name).ok_or_else(|| Error::setting("export", format!("the model has no tensor `{name}`")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// Graph layouts to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// encoder_fast.onnx + decoder_step.onnx (what vitgpt2-node prefers).
    Fast,
    /// Optimum's encoder_model, decoder_model, decoder_with_past_model (onnxruntime,
    /// transformers.js).
    Optimum,
    Both,
}

word_enum!(Layout { Fast = "fast", Optimum = "optimum", Both = "both" });

/// Model sizes for `--random-init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportPreset {
    /// ViT-B/16 at 224 + GPT-2 small (12+12 layers, width 768), 50,000 tokens: benchmarks.
    VitBaseGpt2Small,
    /// ViT 32 px, patch 8, width 32, 2 layers + GPT-2 width 32, 2 layers, 420 tokens: tests.
    Tiny,
}

word_enum!(ExportPreset { VitBaseGpt2Small = "vit-base-gpt2-small", Tiny = "tiny" });

pub fn preset_config(preset: ExportPreset) -> ModelConfig {
    let (encoder, decoder) = match preset {
        ExportPreset::VitBaseGpt2Small => (VitConfig::default(), Gpt2Config { vocab_size: 50_000, ..Gpt2Config::default() }),
        ExportPreset::Tiny => (
            VitConfig { hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64, image_size: 32, patch_size: 8, ..VitConfig::default() },
            Gpt2Config { vocab_size: 420, n_positions: 64, n_embd: 32, n_layer: 2, n_head: 4, ..Gpt2Config::default() },
        ),
    };
    ModelConfig {
        model_type: "vision-encoder-decoder".into(),
        decoder_start_token_id: Some(0),
        pad_token_id: Some(1),
        eos_token_id: Some(2),
        tie_word_embeddings: None,
        encoder,
        decoder,
    }
}

/// File names of the fast layout.
pub fn fast_files(form: WeightForm) -> [String; 2] {
    let suffix = match form {
        WeightForm::Fp32 => graph::FP32,
        WeightForm::Int8 { .. } => graph::FAST_INT8,
    };
    graph::FAST.map(|stem| graph::file(stem, suffix))
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::bundle(path, format!("cannot read: {e}")))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    Ok(format!("{:x}", h.finalize()))
}

fn describe(dir: &Path, name: &str) -> Result<WrittenFile> {
    let p = dir.join(name);
    let bytes = std::fs::metadata(&p).map_err(|e| Error::bundle(&p, e))?.len();
    Ok(WrittenFile { file: name.to_string(), bytes, sha256: sha256_file(&p)? })
}

/// Writes the graphs of `layout` in `form` into `out`; returns the file names.
pub fn write_graphs(cfg: &ModelConfig, w: &Weights, out: &Path, layout: Layout, form: WeightForm) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).map_err(|e| Error::bundle(out, format!("cannot create: {e}")))?;
    let mut names = Vec::new();
    if matches!(layout, Layout::Fast | Layout::Both) {
        let [enc, dec] = fast_files(form);
        write(&out.join(&enc), &onnx::encode(&fast::encoder_graph(cfg, w, form)?))?;
        write(&out.join(&dec), &onnx::encode(&fast::decoder_step_graph(cfg, w, form)?))?;
        names.extend([enc, dec]);
    }
    if matches!(layout, Layout::Optimum | Layout::Both) {
        use optimum::DecoderKind;
        let [enc, merged, dec, past] = optimum::optimum_files(form);
        let onnx_dir = out.join(contract::ONNX_DIR);
        std::fs::create_dir_all(&onnx_dir).map_err(|e| Error::io(&onnx_dir, "create", e))?;
        write(&out.join(&enc), &onnx::encode(&optimum::encoder_graph(cfg, w, form)?))?;
        write(&out.join(&merged), &onnx::encode(&optimum::decoder_graph(cfg, w, form, DecoderKind::Merged)?))?;
        write(&out.join(&dec), &onnx::encode(&optimum::decoder_graph(cfg, w, form, DecoderKind::First)?))?;
        write(&out.join(&past), &onnx::encode(&optimum::decoder_graph(cfg, w, form, DecoderKind::WithPast)?))?;
        names.extend([enc, merged, dec, past]);
    }
    Ok(names)
}

/// Writes config.json, copies the tokenizer, generation and preprocessor configs from `assets`
/// (the preprocessor's size set to the model's image size, every field written out), and adds
/// what transformers.js needs that the folder lacks: `is_encoder_decoder` in config.json,
/// `tokenizer.json` and `tokenizer_config.json` (it reads no `vocab.json` + `merges.txt`), and for
/// slow-tokenizer users `vocab.json` + `merges.txt` and `special_tokens_map.json`. The original
/// ViT-GPT2's folder has no generation or image-processor settings: those written instead are
/// [`crate::model::format::original_defaults`], announced on stderr.
pub fn write_configs(model: &VisionEncoderDecoder, assets: &Path, out: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, "create", e))?;
    let mut config = model.config_json()?;
    // transformers.js generates only for encoder-decoder configs that say so.
    config["is_encoder_decoder"] = json!(true);
    write_json(&out.join(contract::CONFIG), &config)?;
    let mut files = vec![contract::CONFIG.to_string()];
    for (name, what) in crate::model::format::write_original_defaults(assets, &model.config, out)? {
        eprintln!("wrote {name}: {what}");
        files.push(name);
    }
    for name in contract::ASSET_FILES {
        let src = assets.join(name);
        if !src.is_file() {
            continue;
        }
        let dst = out.join(name);
        if name == contract::PREPROCESSOR_CONFIG {
            let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, "read", e))?;
            let mut v: Value = serde_json::from_str(&text).map_err(|e| Error::bundle(&src, e))?;
            let mut pre = PreprocessConfig::from_file(&src)?;
            let side = model.config.encoder.image_size;
            pre.size = ImageSize { height: side, width: side };
            // Every field explicit: transformers.js takes a missing do_normalize as false.
            if let (Some(obj), Ok(Value::Object(full))) = (v.as_object_mut(), serde_json::to_value(&pre)) {
                obj.extend(full.into_iter().filter(|(_, x)| !x.is_null()));
            }
            write_json(&dst, &v)?;
        } else if src != dst {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, "write", e))?;
        }
        files.push(name.to_string());
    }
    if !files.iter().any(|f| f == contract::TOKENIZER_JSON || f == contract::VOCAB_JSON) {
        return Err(Error::bundle(assets, "no tokenizer (tokenizer.json or vocab.json + merges.txt) to copy into the bundle"));
    }
    if !files.iter().any(|f| f == contract::PREPROCESSOR_CONFIG) {
        return Err(Error::bundle(assets.join(contract::PREPROCESSOR_CONFIG), "missing: the bundle needs the image processor's config"));
    }
    let bundle = ModelAssets::with_config(out, model.config.clone(), Origin::Bundle)?;
    files.extend(bundle.tokenizer.complete_files(out, &bundle.special, model.config.decoder.n_positions)?);
    if !out.join(contract::GENERATION_CONFIG).is_file() {
        let s = &bundle.special;
        let g = &bundle.generation;
        let gen = json!({
            "decoder_start_token_id": s.decoder_start, "bos_token_id": s.bos, "eos_token_id": s.eos, "pad_token_id": s.pad,
            "max_length": g.max_length, "num_beams": g.num_beams,
        });
        write_json(&out.join(contract::GENERATION_CONFIG), &gen)?;
        files.push(contract::GENERATION_CONFIG.to_string());
    }
    Ok(files)
}

/// Options of one export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub out: PathBuf,
    pub layout: Layout,
    pub fp32: bool,
    pub int8: bool,
    /// int8 weights in 7 bits ([`WeightForm::Int8`]'s `reduce_range`).
    pub reduce_range: bool,
}

/// Exports `model` (with tokenizer and configs from `assets`) into a bundle; writes
/// `manifest.json` with sizes, sha256 and `provenance`. Returns what was written.
pub fn export_bundle(model: &VisionEncoderDecoder, assets: &Path, opts: &ExportOptions, provenance: Value) -> Result<Vec<WrittenFile>> {
    let w = Weights::from_model(model)?;
    let mut names = write_configs(model, assets, &opts.out)?;
    let mut forms = Vec::new();
    if opts.fp32 {
        forms.push(WeightForm::Fp32);
    }
    if opts.int8 {
        forms.push(WeightForm::Int8 { reduce_range: opts.reduce_range });
    }
    for form in forms {
        let t = std::time::Instant::now();
        names.extend(write_graphs(&model.config, &w, &opts.out, opts.layout, form)?);
        tracing::info!(?form, secs = t.elapsed().as_secs_f64(), "graphs written");
    }
    let files = names.iter().map(|n| describe(&opts.out, n)).collect::<Result<Vec<_>>>()?;
    let manifest = json!({
        "format": "vitgpt2-bundle/1",
        "producer": format!("vitgpt2 {}", env!("CARGO_PKG_VERSION")),
        "opset": onnx::OPSET,
        "provenance": provenance,
        "files": files,
    });
    write_json(&opts.out.join(contract::MANIFEST), &manifest)?;
    Ok(files)
}

/// The model an export starts from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A checkpoint folder (config.json + weights, tokenizer, preprocessor_config.json).
    Checkpoint(PathBuf),
    /// Random weights of a preset size (benchmarks), drawn from `seed`.
    RandomInit { preset: ExportPreset, seed: u64 },
}

/// `vitgpt2-host export`.
#[derive(Debug, Clone)]
pub struct ExportCommand {
    pub source: ModelSource,
    /// Where the tokenizer, generation and preprocessor configs come from (default: the
    /// checkpoint folder; required with a random model).
    pub assets: Option<PathBuf>,
    /// Output bundle folder.
    pub out: PathBuf,
    pub layout: Layout,
    /// Also write int8 graphs.
    pub int8: bool,
    /// Write only the int8 graphs.
    pub int8_only: bool,
    /// int8 weights in 7 bits (see [`WeightForm::Int8`]).
    pub reduce_range: bool,
}

pub fn export_command(args: &ExportCommand) -> Result<i32> {
    let device = Device::Cpu;
    let (model, assets, provenance) = match &args.source {
        ModelSource::Checkpoint(dir) => {
            let (model, report) = VisionEncoderDecoder::from_checkpoint(dir, &device)?;
            let assets = args.assets.clone().unwrap_or_else(|| dir.clone());
            let prov = json!({
                "model": {"checkpoint": dir.display().to_string(), "weights_sha256": report.files.first().map(|p| sha256_file(p)).transpose()?},
                "tokenizer": {"from": assets.display().to_string()},
            });
            (model, assets, prov)
        }
        ModelSource::RandomInit { preset, seed } => {
            let assets = args.assets.clone().ok_or_else(|| Error::setting("--assets", "needed with --random-init (a folder with a tokenizer and preprocessor_config.json)"))?;
            let cfg = preset_config(*preset);
            eprintln!("initialising a random {} model (seed {seed})…", preset.word());
            let model = VisionEncoderDecoder::random_init(&cfg, *seed, &device)?;
            let prov = json!({
                "model": {"random_init": format!("{preset:?}"), "seed": seed},
                "tokenizer": {"from": assets.display().to_string()},
            });
            (model, assets, prov)
        }
    };
    let opts = ExportOptions { out: args.out.clone(), layout: args.layout, fp32: !args.int8_only, int8: args.int8 || args.int8_only, reduce_range: args.reduce_range };
    eprintln!("exporting to {}…", args.out.display());
    let files = export_bundle(&model, &assets, &opts, provenance)?;
    for f in &files {
        println!("{:>12}  {}", f.bytes, f.file);
    }
    Ok(0)
}
