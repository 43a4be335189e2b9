//! Command bodies shared by the binaries: plain option structs in, an exit code out (0: all
//! done; 1: some inputs failed and were reported; errors that end a command are returned and
//! printed by the binary with code 2). The binaries (`src/bin/`) only parse arguments.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::{DtypeChoice, GraphLayout};
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
    pub dtype: DtypeChoice,
    /// Only this layout (`None`: the best the bundle has).
    pub layout: Option<GraphLayout>,
    pub generation: GenerationOverrides,
}

#[derive(Serialize)]
struct CaptionLine<'a> {
    image: String,
    #[serde(flatten)]
    caption: &'a Caption,
    /// The weight form and the files that ran (relative to the model folder).
    dtype: &'a str,
    graphs: &'a [String],
}

#[derive(Serialize)]
struct ErrorLine {
    image: String,
    error: String,
}

/// `vitgpt2-node caption`: loads the bundle and prints one line per image.
pub fn caption(opts: &CaptionOptions) -> Result<i32> {
    let captioner = runtime::open(&opts.model, &LoadOptions { dtype: opts.dtype, layout: opts.layout, threads: opts.threads })?;
    print_captions(&captioner, &opts.images, opts.json, &opts.generation)
}

/// Captions every image and prints one line each (the caption, or with `json` a JSON object;
/// a bad image is reported on stderr and, with `json`, as `{"image":…,"error":…}`). A closed
/// stdout (e.g. `| head`) ends the run quietly. Returns 0, or 1 if an image failed.
pub fn print_captions(captioner: &Captioner, images: &[PathBuf], json: bool, generation: &GenerationOverrides) -> Result<i32> {
    let gen = generation.apply(captioner.generation_config())?;
    let dir = &captioner.assets().dir;
    let graphs: Vec<String> = captioner
        .engine()
        .weight_files()
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
        .collect();
    let dtype = captioner.engine().dtype();
    let stdout = std::io::stdout();
    let mut failure: Option<Error> = None;
    let tally = captioner.caption_files(images.iter().map(PathBuf::as_path), &gen, |path: &Path, outcome| {
        let image = path.display().to_string();
        let line = match outcome {
            Ok(c) if json => serde_json::to_string(&CaptionLine { image, caption: c, dtype, graphs: &graphs }),
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

/// `vitgpt2-node describe`.
#[derive(Debug, Clone)]
pub struct DescribeOptions {
    /// Model bundle directory.
    pub model: PathBuf,
    /// One JSON object instead of text.
    pub json: bool,
}

#[derive(Serialize)]
struct SetLine {
    dtype: &'static str,
    layout: &'static str,
    graphs: Vec<String>,
    /// Operators tract does not implement (empty: the set can run here).
    unsupported_ops: Vec<String>,
}

/// `vitgpt2-node describe`: the bundle's model, and every complete graph set it has, in the order
/// `--dtype auto` tries them, with the operators this node cannot run; which set auto picks.
/// Reads the graphs' protobufs only (nothing is optimized), so it is quick at any model size.
pub fn describe(opts: &DescribeOptions) -> Result<i32> {
    use crate::bundle::{Bundle, DtypeChoice};
    use crate::runtime::OnnxFile;
    let bundle = Bundle::open(&opts.model, DtypeChoice::Auto, None)?;
    let mut sets = Vec::new();
    for set in &bundle.candidates {
        let mut unsupported = Vec::new();
        for p in &set.files {
            unsupported.extend(OnnxFile::read(p)?.unsupported_ops());
        }
        unsupported.sort();
        unsupported.dedup();
        let graphs = set.files.iter().map(|p| p.strip_prefix(&opts.model).unwrap_or(p).display().to_string()).collect();
        sets.push(SetLine { dtype: set.dtype.word(), layout: set.layout.word(), graphs, unsupported_ops: unsupported });
    }
    let auto = sets.iter().find(|s| s.unsupported_ops.is_empty()).map(|s| (s.dtype, s.layout));
    let c = &bundle.assets.config;
    let model = format!(
        "ViT {}px patch {} width {} × {} layers → GPT-2 width {} × {} layers, vocabulary {}",
        c.encoder.image_size, c.encoder.patch_size, c.encoder.hidden_size, c.encoder.num_hidden_layers, c.decoder.n_embd, c.decoder.n_layer, c.decoder.vocab_size
    );
    if opts.json {
        let v = serde_json::json!({
            "model": opts.model.display().to_string(), "config": model, "graph_sets": sets,
            "auto": auto.map(|(d, l)| serde_json::json!({"dtype": d, "layout": l})),
        });
        println!("{}", serde_json::to_string(&v).map_err(|e| Error::serialize("the description", e))?);
        return Ok(0);
    }
    println!("model bundle: {}", opts.model.display());
    println!("  {model}");
    println!("  graph sets, in the order --dtype auto tries them:");
    for s in &sets {
        let status = if s.unsupported_ops.is_empty() { "runs".to_string() } else { format!("cannot run here: {}", s.unsupported_ops.join(", ")) };
        println!("    {:<6} {:<15} {status}: {}", s.dtype, s.layout, s.graphs.join(", "));
    }
    match auto {
        Some((d, l)) => println!("  --dtype auto runs: {d} ({l})"),
        None => println!("  no graph set of this bundle runs here"),
    }
    Ok(0)
}
