//! Command bodies shared by the binaries: plain option structs in, an exit code out (0: all
//! done; 1: some inputs failed and were reported; errors that end a command are returned and
//! printed by the binary with code 2). The binaries (`src/bin/`) only parse arguments.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::Precision;
use crate::captioner::{Caption, Captioner};
use crate::error::{Error, Result};
use crate::generate::GenerationOverrides;
use crate::runtime::{self, LoadOptions};

/// `vitgpt2-node caption`.
#[derive(Debug, Clone)]
pub struct CaptionOptions {
    /// Model bundle directory.
    pub model: PathBuf,
    pub images: Vec<PathBuf>,
    /// One JSON object per image and line instead of one caption per line.
    pub json: bool,
    /// Threads for tract's matrix products.
    pub threads: usize,
    pub precision: Precision,
    pub generation: GenerationOverrides,
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

/// `vitgpt2-node caption`: loads the bundle and prints one line per image.
pub fn caption(opts: &CaptionOptions) -> Result<i32> {
    let captioner = runtime::open(&opts.model, &LoadOptions { precision: opts.precision, threads: opts.threads })?;
    print_captions(&captioner, &opts.images, opts.json, &opts.generation)
}

/// Captions every image and prints one line each (the caption, or with `json` a JSON object;
/// a bad image is reported on stderr and, with `json`, as `{"image":…,"error":…}`). A closed
/// stdout (e.g. `| head`) ends the run quietly. Returns 0, or 1 if an image failed.
pub fn print_captions(captioner: &Captioner, images: &[PathBuf], json: bool, generation: &GenerationOverrides) -> Result<i32> {
    let gen = generation.apply(captioner.generation_config())?;
    let stdout = std::io::stdout();
    let mut failure: Option<Error> = None;
    let tally = captioner.caption_files(images.iter().map(PathBuf::as_path), &gen, |path: &Path, outcome| {
        let image = path.display().to_string();
        let line = match outcome {
            Ok(c) if json => serde_json::to_string(&CaptionLine { image, caption: c }),
            Ok(c) => Ok(c.caption.clone()),
            Err(e) if json => serde_json::to_string(&ErrorLine { image, error: e.to_string() }),
            Err(_) => return ControlFlow::Continue(()),
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                failure = Some(Error::serialize("a caption line", e));
                return ControlFlow::Break(());
            }
        };
        let mut out = stdout.lock();
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(tally.exit_code()),
    }
}

/// Logs go to stderr, one line per event; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
