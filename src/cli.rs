//! Command-line front ends shared by the binaries: argument structs and the commands they run.
//! The binaries only parse arguments and call into here.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use crate::bundle::Precision;
use crate::caption::{Caption, Captioner, GenerationOverrides, LoadOptions};
use crate::error::Result;
use crate::generate::GenerationConfig;

/// Generation flags; unset ones keep the bundle's generation_config.json.
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Beam width (1 = greedy search).
    #[arg(long)]
    pub num_beams: Option<usize>,
    /// Maximum decoder length, decoder start token included.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Minimum decoder length before </s> is allowed.
    #[arg(long)]
    pub min_length: Option<usize>,
    /// Forbid repeating any n-gram of this size (0 = off).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam score = log-prob sum / length^length_penalty.
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// Beam search stopping rule: true, false (heuristic) or never.
    #[arg(long)]
    pub early_stopping: Option<String>,
}

impl GenerationArgs {
    pub fn overrides(&self) -> GenerationOverrides {
        GenerationOverrides {
            num_beams: self.num_beams,
            max_length: self.max_length,
            min_length: self.min_length,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CaptionArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Images to caption.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// One JSON object per image and line: image, caption, tokens, score, steps, ms.
    #[arg(long)]
    pub json: bool,
    /// Threads for matrix products.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Which graphs to run when the bundle has both.
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Serialize)]
struct CaptionLine<'a> {
    image: String,
    #[serde(flatten)]
    caption: &'a Caption,
}

#[derive(Serialize)]
struct ErrorLine {
    image: String,
    error: String,
}

/// Something that captions image files: the tract runtime on the device, the candle model on
/// the host.
pub trait CaptionFiles {
    fn generation_config(&self) -> &GenerationConfig;
    fn caption_path(&self, path: &Path, gen: &GenerationConfig) -> Result<Caption>;
}

impl CaptionFiles for Captioner {
    fn generation_config(&self) -> &GenerationConfig {
        Captioner::generation_config(self)
    }
    fn caption_path(&self, path: &Path, gen: &GenerationConfig) -> Result<Caption> {
        self.caption_file(path, gen)
    }
}

/// Captions every image, one line each; a bad image is reported and skipped.
/// Returns the process exit code: 0 if all were captioned, 1 otherwise.
pub fn caption_images(engine: &dyn CaptionFiles, images: &[PathBuf], json: bool, gen: &GenerationArgs) -> Result<i32> {
    let gen = gen.overrides().apply(engine.generation_config())?;
    let stdout = std::io::stdout();
    let mut failed = 0;
    for path in images {
        let shown = path.display().to_string();
        let line = match engine.caption_path(path, &gen) {
            Ok(c) if json => serde_json::to_string(&CaptionLine { image: shown, caption: &c }).unwrap_or_default(),
            Ok(c) => c.caption,
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                if !json {
                    continue;
                }
                serde_json::to_string(&ErrorLine { image: shown, error: e.to_string() }).unwrap_or_default()
            }
        };
        let mut out = stdout.lock();
        // A closed stdout (e.g. `| head`) ends the run quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(if failed > 0 { 1 } else { 0 });
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `vitgpt2-node caption`.
pub fn caption(args: &CaptionArgs) -> Result<i32> {
    let captioner = Captioner::load(&args.model, &LoadOptions { precision: args.precision, threads: args.threads })?;
    caption_images(&captioner, &args.images, args.json, &args.generation)
}

/// Logs go to stderr, one line per event; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
