//! A model's assets, opened once: `config.json`, generation settings, image processor,
//! tokenizer and the special token ids, with every cross-check between them in one place. Bundles
//! (the device's ONNX graphs) and checkpoints (the host's weights) carry the same assets.

use std::path::{Path, PathBuf};

use crate::bundle::contract;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, RawGenerationConfig};
use crate::preprocess::PreprocessConfig;
use crate::tokenizer::CaptionTokenizer;

/// The token ids that frame a caption, resolved once for training, evaluation and generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// First decoder input (`<s>` = 0 for the French GPT-2).
    pub decoder_start: u32,
    pub bos: Option<u32>,
    /// Generation stops at any of these; training appends the first after each caption.
    pub eos: Vec<u32>,
    /// Fills decoder inputs where labels are ignored (-100) when training.
    pub pad: u32,
}

impl SpecialTokens {
    /// transformers' precedence (`GenerationConfig.from_model_config` + `generate`): the
    /// generation config first, then the top level of `config.json`, then its decoder section;
    /// the decoder start falls back to bos, pad to the first eos.
    /// Errors: [`Error::Invalid`] when there is no decoder start (nor bos) or no eos anywhere
    /// (the caller blames the generation config file).
    pub fn resolve(model: &ModelConfig, gen: &RawGenerationConfig) -> Result<Self> {
        let dec = &model.decoder;
        let bos = gen.bos_token_id.or(dec.bos_token_id);
        let decoder_start = gen
            .decoder_start_token_id
            .or(model.decoder_start_token_id)
            .or(bos)
            .ok_or_else(|| Error::Invalid("no decoder_start_token_id (nor bos_token_id) in generation_config.json or config.json".into()))?;
        let eos = gen
            .eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .or(model.eos_token_id.map(|e| vec![e]))
            .or(dec.eos_token_id.map(|e| vec![e]))
            .filter(|e| !e.is_empty())
            .ok_or_else(|| Error::Invalid("no eos_token_id in generation_config.json or config.json".into()))?;
        let pad = gen.pad_token_id.or(model.pad_token_id).or(dec.pad_token_id).unwrap_or(eos[0]);
        Ok(SpecialTokens { decoder_start, bos, eos, pad })
    }

    /// The first end-of-sequence id (what training appends to every caption).
    pub fn eos(&self) -> u32 {
        self.eos[0]
    }
}

/// Where assets come from; errors are blamed on a "model bundle" or a "checkpoint".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Bundle,
    Checkpoint,
}

/// Settings to use where a checkpoint folder lacks the file (the original ViT-GPT2's folder has
/// neither generation nor image-processor settings); `None`: the usual behaviour (transformers'
/// generation defaults; a missing `preprocessor_config.json` is an error).
#[derive(Debug, Clone, Default)]
pub struct AssetDefaults {
    pub generation: Option<RawGenerationConfig>,
    pub preprocess: Option<PreprocessConfig>,
}

/// Everything a model needs besides its weights, checked to belong together.
pub struct ModelAssets {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub special: SpecialTokens,
    /// The folder's decoding settings (`generation_config.json`, else defaults).
    pub generation: GenerationConfig,
    pub preprocess: PreprocessConfig,
    pub tokenizer: CaptionTokenizer,
}

impl ModelAssets {
    /// Opens `config.json`, `generation_config.json` (optional), `preprocessor_config.json` and
    /// the tokenizer of `dir`. Errors name the file and the problem.
    pub fn open(dir: &Path, origin: Origin) -> Result<Self> {
        let blame = |e: Error| if origin == Origin::Checkpoint { e.into_checkpoint() } else { e };
        if !dir.is_dir() {
            let hint = match origin {
                Origin::Bundle => "not a directory; pass the model bundle's folder (e.g. models/synthetic-fr)",
                Origin::Checkpoint => "not a directory; pass a Hugging Face checkpoint folder (config.json + model.safetensors or pytorch_model.bin)",
            };
            return Err(blame(Error::bundle(dir, hint)));
        }
        let config = ModelConfig::from_file(&required(dir, contract::CONFIG, origin)?).map_err(blame)?;
        Self::with_config(dir, config, origin)
    }

    /// As [`Self::open`] with `config` given (a checkpoint format that stores another config, or
    /// a model built in memory); the other files still come from `dir`.
    pub fn with_config(dir: &Path, config: ModelConfig, origin: Origin) -> Result<Self> {
        Self::with_defaults(dir, config, origin, &AssetDefaults::default())
    }

    /// As [`Self::with_config`], with `defaults` standing in for the generation and
    /// image-processor files `dir` lacks.
    pub fn with_defaults(dir: &Path, config: ModelConfig, origin: Origin, defaults: &AssetDefaults) -> Result<Self> {
        let blame = |e: Error| if origin == Origin::Checkpoint { e.into_checkpoint() } else { e };
        let gen_path = dir.join(contract::GENERATION_CONFIG);
        let raw = match &defaults.generation {
            Some(g) if !gen_path.is_file() => g.clone(),
            _ => read_generation(&gen_path).map_err(blame)?,
        };
        let special = SpecialTokens::resolve(&config, &raw).map_err(|m| blame(Error::bundle(&gen_path, m)))?;
        let generation = GenerationConfig::from_raw(&raw, &special).map_err(|m| blame(Error::bundle(&gen_path, m)))?;
        let pre_path = dir.join(contract::PREPROCESSOR_CONFIG);
        let preprocess = match &defaults.preprocess {
            Some(p) if !pre_path.is_file() => p.clone(),
            _ => PreprocessConfig::from_file(&required(dir, contract::PREPROCESSOR_CONFIG, origin)?).map_err(blame)?,
        };
        let tokenizer = CaptionTokenizer::from_dir(dir).map_err(blame)?;
        let assets = ModelAssets { dir: dir.to_path_buf(), config, special, generation, preprocess, tokenizer };
        assets.check().map_err(blame)?;
        Ok(assets)
    }

    /// The cross-checks: image size against the encoder, tokenizer against the vocabulary,
    /// special ids inside the vocabulary.
    fn check(&self) -> Result<()> {
        let cfg = &self.config;
        let (h, w) = (self.preprocess.size.height, self.preprocess.size.width);
        let side = cfg.encoder.image_size;
        if (h, w) != (side, side) {
            return Err(Error::bundle(
                self.dir.join(contract::PREPROCESSOR_CONFIG),
                format!("size {h}x{w} differs from the encoder's image_size {side} in config.json: the processor and the model do not belong together"),
            ));
        }
        let vocab = cfg.decoder.vocab_size;
        let n = self.tokenizer.vocab_size();
        if n > vocab {
            return Err(Error::bundle(
                self.tokenizer.source(),
                format!("tokenizer has {n} tokens but config.json's decoder.vocab_size is {vocab}: tokenizer and model do not belong together"),
            ));
        }
        if n < vocab {
            tracing::warn!(tokenizer = n, model = vocab, "model vocabulary is larger than the tokenizer's (padded embedding?)");
        }
        let s = &self.special;
        // pad only fills training inputs; a pad id outside the vocabulary is the trainer's error.
        for id in std::iter::once(s.decoder_start).chain(s.eos.iter().copied()) {
            if id as usize >= vocab {
                return Err(Error::bundle(
                    self.dir.join(contract::GENERATION_CONFIG),
                    format!("token id {id} is outside the vocabulary ({vocab})"),
                ));
            }
        }
        Ok(())
    }
}

fn required(dir: &Path, name: &str, origin: Origin) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    Err(match origin {
        Origin::Bundle => {
            Error::bundle(p, "missing file (a bundle needs config.json, preprocessor_config.json, a tokenizer and ONNX graphs)")
        }
        Origin::Checkpoint if name == contract::PREPROCESSOR_CONFIG => {
            Error::checkpoint(p, "missing: copy the ViT checkpoint's preprocessor_config.json into the checkpoint folder")
        }
        Origin::Checkpoint => Error::checkpoint(p, "missing file"),
    })
}

/// `generation_config.json`'s fields; all unset when there is no such file.
fn read_generation(path: &Path) -> Result<RawGenerationConfig> {
    if !path.is_file() {
        tracing::info!(path = %path.display(), "no generation_config.json: using config.json and transformers' defaults");
        return Ok(RawGenerationConfig::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::bundle(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::bundle(path, format!("not a valid generation config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::OneOrMany;

    fn model(start: Option<u32>, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) -> ModelConfig {
        let mut cfg: ModelConfig =
            serde_json::from_value(serde_json::json!({"encoder": {}, "decoder": {}})).expect("minimal config");
        cfg.decoder_start_token_id = start;
        cfg.decoder.bos_token_id = bos;
        cfg.decoder.eos_token_id = eos;
        cfg.decoder.pad_token_id = pad;
        cfg.eos_token_id = None;
        cfg.pad_token_id = None;
        cfg
    }

    #[test]
    fn decoder_bos_alone_is_the_decoder_start() {
        // A checkpoint that sets only decoder.bos_token_id: generation and training (which both
        // take SpecialTokens) start from it.
        let s = SpecialTokens::resolve(&model(None, Some(5), Some(7), None), &RawGenerationConfig::default()).unwrap();
        assert_eq!(s, SpecialTokens { decoder_start: 5, bos: Some(5), eos: vec![7], pad: 7 });
        let g = GenerationConfig::from_raw(&RawGenerationConfig::default(), &s).unwrap();
        assert_eq!((g.decoder_start_token_id, g.pad_token_id, g.eos_token_ids.clone()), (5, 7, vec![7]));
        assert_eq!(GenerationConfig::greedy(&s, 9).decoder_start_token_id, 5);
    }

    #[test]
    fn generation_config_wins_over_config_json() {
        let raw = RawGenerationConfig {
            decoder_start_token_id: Some(3),
            eos_token_id: Some(OneOrMany::Many(vec![9, 2])),
            pad_token_id: Some(4),
            ..Default::default()
        };
        let s = SpecialTokens::resolve(&model(Some(0), Some(0), Some(2), Some(1)), &raw).unwrap();
        assert_eq!(s, SpecialTokens { decoder_start: 3, bos: Some(0), eos: vec![9, 2], pad: 4 });
        assert_eq!(s.eos(), 9);
    }

    #[test]
    fn top_level_start_wins_over_bos_and_missing_ids_are_errors() {
        let s = SpecialTokens::resolve(&model(Some(8), Some(0), Some(2), Some(1)), &RawGenerationConfig::default()).unwrap();
        assert_eq!(s.decoder_start, 8);
        let e = SpecialTokens::resolve(&model(None, None, Some(2), None), &RawGenerationConfig::default()).unwrap_err().to_string();
        assert!(e.contains("decoder_start_token_id"), "{e}");
        let e = SpecialTokens::resolve(&model(Some(0), None, None, None), &RawGenerationConfig::default()).unwrap_err().to_string();
        assert!(e.contains("eos_token_id"), "{e}");
    }
}
