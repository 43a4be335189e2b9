//! Image in, French caption out: bundle + preprocessing + runtime + generation + tokenizer,
//! with the time spent in each stage.

use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::bundle::{Bundle, Precision};
use crate::error::{Error, Result};
use crate::generate::{generate, EarlyStopping, GenerationConfig};
use crate::preprocess;
use crate::runtime::{self, Runtime};

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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Caption {
    pub caption: String,
    /// Generated ids without the decoder start token, up to and including `</s>` if produced.
    pub tokens: Vec<u32>,
    pub score: f32,
    pub steps: usize,
    pub ms: StageMs,
}

/// Generation settings given on the command line or in a config file; unset ones keep the
/// bundle's `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationOverrides {
    pub num_beams: Option<usize>,
    pub max_length: Option<usize>,
    pub min_length: Option<usize>,
    pub no_repeat_ngram_size: Option<usize>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<String>,
}

impl GenerationOverrides {
    pub fn apply(&self, base: &GenerationConfig) -> Result<GenerationConfig> {
        let mut g = base.clone();
        if let Some(v) = self.num_beams {
            g.num_beams = v;
        }
        if let Some(v) = self.max_length {
            g.max_length = v;
        }
        if let Some(v) = self.min_length {
            g.min_length = v;
        }
        if let Some(v) = self.no_repeat_ngram_size {
            g.no_repeat_ngram_size = v;
        }
        if let Some(v) = self.length_penalty {
            g.length_penalty = v;
        }
        if let Some(v) = &self.early_stopping {
            g.early_stopping = EarlyStopping::parse(v)
                .ok_or_else(|| Error::setting("early_stopping", format!("`{v}`: use true, false or never")))?;
        }
        g.validate().map_err(|e| Error::setting("generation", e))?;
        Ok(g)
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub precision: Precision,
    /// Threads for tract's matrix products (0 or 1: single-threaded).
    pub threads: usize,
}

pub struct Captioner {
    bundle: Bundle,
    runtime: Box<dyn Runtime>,
    /// Milliseconds spent loading and optimizing the graphs.
    pub load_ms: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Captioner {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        runtime::set_threads(opts.threads);
        let bundle = Bundle::open(dir, opts.precision)?;
        let runtime = runtime::load(&bundle)?;
        tracing::info!(model = %dir.display(), graphs = %runtime.describe(), "model loaded");
        Ok(Captioner { bundle, runtime, load_ms: ms(t0) })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The bundle's generation settings.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.bundle.generation
    }

    /// Captions an image file.
    pub fn caption_file(&self, path: &Path, gen: &GenerationConfig) -> Result<Caption> {
        let t0 = Instant::now();
        let img = preprocess::load_image(path)?;
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
        let pixels = self.bundle.preprocess.pixel_values(img);
        let preprocess = ms(t0);
        let t1 = Instant::now();
        let encoding = self.runtime.encode(pixels)?;
        let encoder = ms(t1);
        let t2 = Instant::now();
        let generated = generate(gen, |rows| encoding.session(rows))?;
        let decoder = ms(t2);
        let caption = self.bundle.tokenizer.decode(&generated.tokens)?;
        Ok(Caption {
            caption,
            tokens: generated.tokens,
            score: generated.score,
            steps: generated.steps,
            ms: StageMs { decode: 0.0, preprocess, encoder, decoder, total: ms(t0) },
        })
    }

    /// Pixel values for an image, exactly as the encoder receives them.
    pub fn pixel_values(&self, img: &RgbImage) -> ndarray::Array4<f32> {
        self.bundle.preprocess.pixel_values(img)
    }

    /// The runtime, for benchmarks and parity checks that drive the graphs directly.
    pub fn runtime(&self) -> &dyn Runtime {
        self.runtime.as_ref()
    }
}
