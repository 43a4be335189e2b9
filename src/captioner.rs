//! Image in, French caption out — the one captioning pipeline. A [`Captioner`] is a model's
//! assets (image processor, tokenizer, generation settings) plus an [`Engine`] (tract on the
//! device, candle on the host); every command, the daemon and every evaluation caption through
//! it, with the time spent in each stage.

use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use ndarray::Array4;
use serde::Serialize;

use crate::assets::ModelAssets;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig};
use crate::preprocess::{self, DecodeLimits};

/// Milliseconds per stage of one caption.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StageMs {
    /// Reading and decoding the image file (0 for in-memory frames).
    pub decode: f64,
    pub preprocess: f64,
    pub encoder: f64,
    /// All decoder steps of the search.
    pub decoder: f64,
    pub total: f64,
}

/// One caption and how it was made.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Caption {
    /// The generated ids decoded as the tokenizers library's `decode(ids, skip_special_tokens=True)`.
    pub caption: String,
    /// Generated ids without the decoder start token, up to and including the stop id if produced.
    pub tokens: Vec<u32>,
    /// Sum of the token log-probabilities divided by `length ^ length_penalty`.
    pub score: f32,
    /// Decoder steps run.
    pub steps: usize,
    pub ms: StageMs,
}

/// How a run over several image files went: a bad image is reported, skipped and counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub captioned: usize,
    pub failed: usize,
}

impl Tally {
    /// 0 when every image was captioned, 1 when some failed (the commands' exit code).
    pub fn exit_code(&self) -> i32 {
        i32::from(self.failed > 0)
    }
}

pub struct Captioner {
    assets: ModelAssets,
    engine: Box<dyn Engine>,
    limits: DecodeLimits,
    /// Milliseconds spent opening the assets and loading the engine.
    pub load_ms: f64,
    /// Set once a caption is out: the weights then move to huge pages in the background.
    settled: std::sync::Once,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Captioner {
    /// `assets` and the `engine` that runs their model; `load_ms` is what loading them took.
    pub fn new(assets: ModelAssets, engine: Box<dyn Engine>, load_ms: f64) -> Self {
        Captioner { assets, engine, limits: DecodeLimits::default(), load_ms, settled: std::sync::Once::new() }
    }

    /// The same captioner with other limits on the image files it decodes.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn assets(&self) -> &ModelAssets {
        &self.assets
    }

    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// The model's own generation settings (its `generation_config.json`).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.assets.generation
    }

    /// Captions an image file (JPEG, PNG, WebP, BMP, TIFF, GIF). Errors: [`Error::Image`] naming
    /// the file when it cannot be read or decoded or is over the decode limits.
    pub fn caption_file(&self, path: &Path, gen: &GenerationConfig) -> Result<Caption> {
        let t0 = Instant::now();
        let img = preprocess::load_image_limited(path, &self.limits)?;
        let decode = ms(t0);
        let mut c = self.caption_image(&img, gen)?;
        c.ms.decode = decode;
        c.ms.total += decode;
        Ok(c)
    }

    /// Captions an RGB frame.
    pub fn caption_image(&self, img: &RgbImage, gen: &GenerationConfig) -> Result<Caption> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::image("<frame>", "empty image"));
        }
        let t0 = Instant::now();
        let pixels = self.pixel_values(img);
        let preprocess = ms(t0);
        let t1 = Instant::now();
        let encoding = self.engine.encode(pixels)?;
        let encoder = ms(t1);
        let t2 = Instant::now();
        let generated = generate(gen, |rows| encoding.session(rows))?;
        let decoder = ms(t2);
        let caption = self.assets.tokenizer.decode(&generated.tokens)?;
        // After the first caption, not before: a cold start's first caption never waits for it.
        self.settled.call_once(crate::runtime::weight_memory::collapse_in_background);
        Ok(Caption {
            caption,
            tokens: generated.tokens,
            score: generated.score,
            steps: generated.steps,
            ms: StageMs { decode: 0.0, preprocess, encoder, decoder, total: ms(t0) },
        })
    }

    /// Captions image files in order, handing each outcome to `each`. A bad image is reported
    /// on stderr with its path (`error: image …`), skipped and counted; the run goes on.
    /// Errors of the engine itself end the run.
    pub fn caption_files<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p Path>,
        gen: &GenerationConfig,
        mut each: impl FnMut(&Path, std::result::Result<&Caption, &Error>) -> std::ops::ControlFlow<()>,
    ) -> Result<Tally> {
        let mut tally = Tally::default();
        for path in paths {
            let flow = match self.caption_file(path, gen) {
                Ok(c) => {
                    tally.captioned += 1;
                    each(path, Ok(&c))
                }
                Err(e @ Error::Image { .. }) => {
                    tally.failed += 1;
                    eprintln!("error: {e}");
                    each(path, Err(&e))
                }
                Err(e) => return Err(e),
            };
            if flow.is_break() {
                break;
            }
        }
        Ok(tally)
    }

    /// Pixel values `[1, 3, H, W]` for an image, exactly as the encoder receives them.
    pub fn pixel_values(&self, img: &RgbImage) -> Array4<f32> {
        self.assets.preprocess.pixel_values(img)
    }
}
