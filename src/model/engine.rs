//! The candle model as an [`Engine`]: what `vitgpt2-host caption`, `evaluate` and training's
//! evaluation caption with, through the same [`Captioner`] as the device.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use ndarray::Array4;

use super::format;
use super::ved::VisionEncoderDecoder;
use crate::assets::{ModelAssets, Origin};
use crate::bundle::contract;
use crate::captioner::Captioner;
use crate::engine::{Engine, ImageEncoding};
use crate::error::{Error, Result};
use crate::generate::DecoderSession;

/// A candle model (shared with a trainer that keeps updating its weights).
pub struct CandleEngine {
    model: Arc<VisionEncoderDecoder>,
    files: Vec<PathBuf>,
}

impl CandleEngine {
    /// `files`: the weight files the model was read from (none for a model built in memory).
    pub fn new(model: Arc<VisionEncoderDecoder>, files: Vec<PathBuf>) -> Self {
        CandleEngine { model, files }
    }
}

impl Engine for CandleEngine {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let shape = pixel_values.shape().to_vec();
        let data: Vec<f32> = pixel_values.into_iter().collect();
        let encoded = Tensor::from_vec(data, shape, self.model.device())
            .and_then(|x| self.model.encode(&x, false))
            .map_err(|e| Error::runtime("candle encoder", e))?;
        Ok(Box::new(CandleEncoding { model: &self.model, encoded }))
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        format!("candle on {:?}: {}", self.model.device(), if files.is_empty() { "weights in memory".into() } else { files.join(", ") })
    }

    fn dtype(&self) -> &str {
        "fp32"
    }

    fn weight_files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
}

struct CandleEncoding<'a> {
    model: &'a VisionEncoderDecoder,
    /// `[1, enc_len, n_embd]`, after `enc_to_dec_proj`.
    encoded: Tensor,
}

impl ImageEncoding for CandleEncoding<'_> {
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>> {
        let s = self.model.session(&self.encoded, rows).map_err(|e| Error::runtime("candle decoder", e))?;
        Ok(Box::new(s))
    }
}

/// The captioner of a checkpoint folder (`config.json`, weights, preprocessor_config.json,
/// tokenizer, optionally generation_config.json; or the original ViT-GPT2's folder, whose
/// missing settings come from [`format::original_defaults`], each announced by a warning), on
/// `device`. Errors: [`Error::Checkpoint`] naming the file and the problem.
pub fn open_checkpoint(dir: &Path, device: &Device) -> Result<Captioner> {
    let t0 = Instant::now();
    let (model, report) = VisionEncoderDecoder::from_checkpoint(dir, device)?;
    tracing::info!(model = %dir.display(), loaded = report.loaded.len(), initialised = report.initialised.len(), "candle model loaded");
    let defaults = format::original_defaults(&format::detect(dir)?, &model.config);
    if defaults.generation.is_some() && !dir.join(contract::GENERATION_CONFIG).is_file() {
        tracing::warn!("{}: generation settings: {}", dir.display(), format::generation_note());
    }
    if !dir.join(contract::PREPROCESSOR_CONFIG).is_file() {
        if let Some(p) = &defaults.preprocess {
            tracing::warn!("{}: image processor: {}", dir.display(), format::preprocess_note(p.size.height));
        }
    }
    let assets = ModelAssets::with_defaults(dir, model.config.clone(), Origin::Checkpoint, &defaults)?;
    let engine = CandleEngine::new(Arc::new(model), report.files);
    Ok(Captioner::new(assets, Box::new(engine), t0.elapsed().as_secs_f64() * 1e3))
}
