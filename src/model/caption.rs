//! Captioning with the candle model (`vitgpt2-host caption`): same preprocessing, generation
//! and tokenizer as the device runtime, so the output lines are the same.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::ved::VisionEncoderDecoder;
use crate::caption::{Caption, StageMs};
use crate::cli::CaptionFiles;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig};
use crate::preprocess::{load_image, PreprocessConfig};
use crate::tokenizer::CaptionTokenizer;

pub struct HostCaptioner {
    model: VisionEncoderDecoder,
    generation: GenerationConfig,
    preprocess: PreprocessConfig,
    tokenizer: CaptionTokenizer,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl HostCaptioner {
    /// Loads a checkpoint folder: config.json, weights, generation_config.json (optional),
    /// preprocessor_config.json and the tokenizer.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, report) = VisionEncoderDecoder::from_checkpoint(dir, device)?;
        tracing::info!(model = %dir.display(), loaded = report.loaded.len(), initialised = report.initialised.len(), "candle model loaded");
        let generation = GenerationConfig::from_bundle(&dir.join("generation_config.json"), &model.config)?;
        let pre_path = dir.join("preprocessor_config.json");
        if !pre_path.is_file() {
            return Err(Error::bundle(&pre_path, "missing: copy the ViT checkpoint's preprocessor_config.json into the checkpoint folder"));
        }
        let preprocess = PreprocessConfig::from_file(&pre_path)?;
        let side = model.config.encoder.image_size;
        if preprocess.size.height != side || preprocess.size.width != side {
            return Err(Error::bundle(
                &pre_path,
                format!(
                    "size is {}x{} but config.json's encoder.image_size is {side}: the processor and the model do not belong together",
                    preprocess.size.height, preprocess.size.width
                ),
            ));
        }
        let mut special = vec![generation.decoder_start_token_id, generation.pad_token_id];
        special.extend(generation.eos_token_ids.iter().copied());
        let tokenizer = CaptionTokenizer::from_dir(dir, &special)?;
        if tokenizer.vocab_size() > model.config.decoder.vocab_size {
            return Err(Error::bundle(
                tokenizer.source(),
                format!(
                    "tokenizer has {} tokens but config.json's decoder.vocab_size is {}: tokenizer and model do not belong together",
                    tokenizer.vocab_size(),
                    model.config.decoder.vocab_size
                ),
            ));
        }
        Ok(Self { model, generation, preprocess, tokenizer })
    }

    pub fn model(&self) -> &VisionEncoderDecoder {
        &self.model
    }

    /// Captions an RGB image.
    pub fn caption_image(&self, img: &RgbImage, gen: &GenerationConfig) -> Result<Caption> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::image("<frame>", "empty image"));
        }
        let t0 = Instant::now();
        let pixels = self.preprocess.pixel_values(img);
        let preprocess = ms(t0);
        let t1 = Instant::now();
        let shape = pixels.shape().to_vec();
        let data: Vec<f32> = pixels.into_iter().collect();
        let enc = Tensor::from_vec(data, shape, self.model.device())
            .and_then(|x| self.model.encode(&x, false))
            .map_err(|e| Error::runtime("candle encoder", e))?;
        let encoder = ms(t1);
        let t2 = Instant::now();
        let generated =
            generate(gen, |rows| self.model.session(&enc, rows).map_err(|e| Error::runtime("candle decoder", e)))?;
        let decoder = ms(t2);
        let caption = self.tokenizer.decode(&generated.tokens)?;
        Ok(Caption {
            caption,
            tokens: generated.tokens,
            score: generated.score,
            steps: generated.steps,
            ms: StageMs { decode: 0.0, preprocess, encoder, decoder, total: ms(t0) },
        })
    }
}

impl CaptionFiles for HostCaptioner {
    fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    fn caption_path(&self, path: &Path, gen: &GenerationConfig) -> Result<Caption> {
        let t0 = Instant::now();
        let img = load_image(path)?;
        let decode = ms(t0);
        let mut c = self.caption_image(&img, gen)?;
        c.ms.decode = decode;
        c.ms.total += decode;
        Ok(c)
    }
}
