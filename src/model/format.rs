//! Which kind of checkpoint folder this is, and what the original ViT-GPT2's folder lacks.
//!
//! Three kinds are read, told apart by their files:
//! - transformers' `VisionEncoderDecoderModel` saved by PyTorch: `config.json` +
//!   `model.safetensors` (or `pytorch_model.bin`); preferred when a folder has several;
//! - the same saved by Flax (`FlaxVisionEncoderDecoderModel`): `config.json` with
//!   `model_type: "vision-encoder-decoder"` + `flax_model.msgpack`;
//! - the original ViT-GPT2 project's checkpoint (flax-community/vit-gpt2, e.g.
//!   `checkpoints/ckpt_5/`): `config.json` with `model_type: "vit-gpt2"` (nested `vit_config`,
//!   `gpt2_config`) + `flax_model.msgpack`, next to the French GPT-2's `vocab.json` +
//!   `merges.txt`. Its cross-attention is causal over the image tokens, so the importer sets
//!   `decoder.cross_attention_causal`; the folder has no generation or image-processor settings,
//!   so [`original_defaults`] supplies the ones its demo used.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::flax::FlaxTree;
use crate::assets::AssetDefaults;
use crate::bundle::contract;
use crate::config::{Gpt2Config, ModelConfig, VitConfig};
use crate::error::{Error, Result};
use crate::generate::{OneOrMany, RawGenerationConfig};
use crate::preprocess::{ImageSize, PreprocessConfig};

/// The Flax weight file.
pub const FLAX_WEIGHTS: &str = "flax_model.msgpack";

/// Beam width and `max_length` (counting the decoder start token) of the original project's demo
/// (the flax-community/vit-gpt2 Space's `model.py`: `max_length = 32`, `num_beams = 8`, passed to
/// its `generate`; a public copy is github.com/iFind-Anveshan/cap `model.py`). Used when the
/// original's folder has no `generation_config.json`, which it never has.
pub const ORIGINAL_NUM_BEAMS: usize = 8;
pub const ORIGINAL_MAX_LENGTH: usize = 32;

/// A checkpoint folder's kind and weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// `model.safetensors` or `pytorch_model.bin` (transformers' PyTorch names).
    PyTorch(PathBuf),
    /// `flax_model.msgpack` with the parameter tree `tree`.
    Flax(PathBuf, FlaxTree),
}

impl CheckpointFormat {
    pub fn weights(&self) -> &Path {
        match self {
            CheckpointFormat::PyTorch(p) | CheckpointFormat::Flax(p, _) => p,
        }
    }

    /// In words, for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            CheckpointFormat::PyTorch(_) => "transformers VisionEncoderDecoderModel (PyTorch weights)",
            CheckpointFormat::Flax(_, FlaxTree::Transformers) => "transformers FlaxVisionEncoderDecoderModel",
            CheckpointFormat::Flax(_, FlaxTree::Original) => "the original ViT-GPT2 (flax-community/vit-gpt2) Flax checkpoint",
        }
    }
}

/// The PyTorch weight file of `dir` (model.safetensors, else pytorch_model.bin), if any.
/// Errors: sharded weights (an `*.index.json`), which are not supported.
pub fn pytorch_weights(dir: &Path) -> Result<Option<PathBuf>> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    for index in ["model.safetensors.index.json", "pytorch_model.bin.index.json", "flax_model.msgpack.index.json"] {
        if dir.join(index).is_file() {
            return Err(Error::checkpoint(
                dir.join(index),
                "sharded checkpoints are not supported: re-save it with transformers' save_pretrained(max_shard_size=\"100GB\")",
            ));
        }
    }
    Ok(None)
}

/// Tells the kind of checkpoint in `dir` from its files (and, for Flax weights, config.json's
/// `model_type`). Errors, one line each: not a folder; no weights of a known kind; Flax weights
/// with a config.json that is neither `vision-encoder-decoder` nor `vit-gpt2`.
pub fn detect(dir: &Path) -> Result<CheckpointFormat> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "not a directory; pass a checkpoint folder (config.json + model.safetensors, pytorch_model.bin or flax_model.msgpack)"));
    }
    if let Some(p) = pytorch_weights(dir)? {
        return Ok(CheckpointFormat::PyTorch(p));
    }
    let flax = dir.join(FLAX_WEIGHTS);
    if !flax.is_file() {
        return Err(Error::checkpoint(
            dir,
            "no model.safetensors, pytorch_model.bin or flax_model.msgpack: not a checkpoint vitgpt2 reads (transformers' VisionEncoderDecoderModel saved by PyTorch or Flax, or the original ViT-GPT2's config.json + flax_model.msgpack)",
        ));
    }
    let config = dir.join(contract::CONFIG);
    let raw = read_json(&config)?;
    match raw.get("model_type").and_then(Value::as_str) {
        Some("vit-gpt2") => Ok(CheckpointFormat::Flax(flax, FlaxTree::Original)),
        Some("vision-encoder-decoder") => Ok(CheckpointFormat::Flax(flax, FlaxTree::Transformers)),
        other => Err(Error::checkpoint(
            config,
            format!(
                "model_type is {}: with flax_model.msgpack, vitgpt2 reads transformers' FlaxVisionEncoderDecoderModel (vision-encoder-decoder) and the original ViT-GPT2 (vit-gpt2)",
                other.map(|s| format!("`{s}`")).unwrap_or_else(|| "missing".into())
            ),
        )),
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Err(Error::checkpoint(path, "missing file"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))
}

/// The original's `config.json` (`ViTGPT2Config`: `vit_config`, `gpt2_config`) as a
/// `VisionEncoderDecoderConfig`: the typed config and the JSON to save (both sections kept with
/// every key they had). The decoder becomes a cross-attending decoder (`is_decoder`,
/// `add_cross_attention`: the original's nested config says `is_decoder: false`, which its code
/// ignores) with `cross_attention_causal`; the decoder start is bos (the original's convention:
/// it stores no `decoder_start_token_id`). Errors name the file and the key.
pub fn original_config(path: &Path) -> Result<(ModelConfig, Value)> {
    let raw = read_json(path)?;
    let section = |key: &str| -> Result<Value> {
        raw.get(key)
            .filter(|v| v.is_object())
            .cloned()
            .ok_or_else(|| Error::checkpoint(path, format!("no `{key}` object: not an original ViT-GPT2 config.json")))
    };
    let vit_raw = section("vit_config")?;
    let mut gpt_raw = section("gpt2_config")?;
    for (k, v) in [("is_decoder", json!(true)), ("add_cross_attention", json!(true)), ("cross_attention_causal", json!(true))] {
        gpt_raw[k] = v;
    }
    let encoder: VitConfig =
        serde_json::from_value(vit_raw.clone()).map_err(|e| Error::checkpoint(path, format!("vit_config is not a ViT config ({e})")))?;
    let decoder: Gpt2Config =
        serde_json::from_value(gpt_raw.clone()).map_err(|e| Error::checkpoint(path, format!("gpt2_config is not a GPT-2 config ({e})")))?;
    encoder_decoder_config(encoder, decoder, vit_raw, gpt_raw, path)
}

/// A ViT and a cross-attending GPT-2 joined as transformers' `from_encoder_decoder_pretrained`
/// joins them: the typed `VisionEncoderDecoderConfig` (the decoder start is the decoder's bos,
/// pad falls back to eos) and the config.json to save, each part's JSON section kept whole.
/// Errors: an invalid combination ([`ModelConfig::validate`]), blamed on `blame`.
pub fn encoder_decoder_config(encoder: VitConfig, decoder: Gpt2Config, vit_raw: Value, gpt_raw: Value, blame: &Path) -> Result<(ModelConfig, Value)> {
    let cfg = ModelConfig {
        model_type: "vision-encoder-decoder".into(),
        decoder_start_token_id: decoder.bos_token_id,
        pad_token_id: decoder.pad_token_id.or(decoder.eos_token_id),
        eos_token_id: decoder.eos_token_id,
        tie_word_embeddings: Some(false),
        encoder,
        decoder,
    };
    cfg.validate().map_err(|m| Error::checkpoint(blame, m))?;
    let saved = json!({
        "architectures": ["VisionEncoderDecoderModel"],
        "model_type": "vision-encoder-decoder",
        "is_encoder_decoder": true,
        "encoder": vit_raw,
        "decoder": gpt_raw,
    });
    Ok((cfg, saved))
}

/// The settings the original's folder lacks, for a model of config `cfg`: its demo's beam search
/// ([`ORIGINAL_NUM_BEAMS`], [`ORIGINAL_MAX_LENGTH`]) with the model's special tokens, and ViT's
/// image processor (google/vit-base-patch16-224-in21k's, which the demo used: bilinear, 1/255,
/// mean = std = 0.5) at the encoder's image size (224 for the real model). Empty for every other
/// kind of checkpoint (their folders carry their own files or get transformers' defaults).
pub fn original_defaults(format: &CheckpointFormat, cfg: &ModelConfig) -> AssetDefaults {
    if !matches!(format, CheckpointFormat::Flax(_, FlaxTree::Original)) {
        return AssetDefaults::default();
    }
    let side = cfg.encoder.image_size;
    AssetDefaults {
        generation: Some(RawGenerationConfig {
            num_beams: Some(ORIGINAL_NUM_BEAMS),
            max_length: Some(ORIGINAL_MAX_LENGTH),
            decoder_start_token_id: cfg.decoder_start_token_id,
            bos_token_id: cfg.decoder.bos_token_id,
            eos_token_id: cfg.eos_token_id.map(OneOrMany::One),
            pad_token_id: cfg.pad_token_id,
            ..Default::default()
        }),
        preprocess: Some(PreprocessConfig { size: ImageSize { height: side, width: side }, ..PreprocessConfig::default() }),
    }
}

/// Writes into `out` the `generation_config.json` and `preprocessor_config.json` that the
/// checkpoint folder `src` lacks, from [`original_defaults`] (nothing for other kinds of
/// checkpoint). Returns the file names written, each with what it holds and why, for the report.
pub fn write_original_defaults(src: &Path, cfg: &ModelConfig, out: &Path) -> Result<Vec<(String, String)>> {
    let Ok(format) = detect(src) else { return Ok(Vec::new()) };
    let defaults = original_defaults(&format, cfg);
    let mut written = Vec::new();
    if let Some(g) = &defaults.generation {
        if !src.join(contract::GENERATION_CONFIG).is_file() {
            let v = json!({
                "decoder_start_token_id": g.decoder_start_token_id, "bos_token_id": g.bos_token_id,
                "eos_token_id": cfg.eos_token_id, "pad_token_id": g.pad_token_id,
                "num_beams": g.num_beams, "max_length": g.max_length,
            });
            crate::error::write_json(&out.join(contract::GENERATION_CONFIG), &v)?;
            written.push((contract::GENERATION_CONFIG.to_string(), generation_note()));
        }
    }
    if let Some(p) = &defaults.preprocess {
        if !src.join(contract::PREPROCESSOR_CONFIG).is_file() {
            crate::error::write_json(&out.join(contract::PREPROCESSOR_CONFIG), p)?;
            written.push((contract::PREPROCESSOR_CONFIG.to_string(), preprocess_note(p.size.height)));
        }
    }
    Ok(written)
}

/// What [`original_defaults`] uses for generation, and why.
pub fn generation_note() -> String {
    format!(
        "num_beams {ORIGINAL_NUM_BEAMS}, max_length {ORIGINAL_MAX_LENGTH} (counting <s>): the original project's demo settings (the folder has no generation_config.json)"
    )
}

/// What [`original_defaults`] uses for preprocessing, and why.
pub fn preprocess_note(side: usize) -> String {
    format!("ViT's image processor at {side}×{side}: bilinear, 1/255, mean = std = 0.5, as the original's demo (google/vit-base-patch16-224-in21k's; the folder has no preprocessor_config.json)")
}
