//! `vitgpt2-host train-and-export`: train (or take a checkpoint), export fp32 and int8
//! fast-layout graphs, evaluate candle, tract fp32 and tract int8 on a held-out set (scores,
//! latency, token parity), and record it all in the bundle's manifest.json.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use serde_json::{json, Value};

use super::{export_bundle, sha256_file, ExportOptions, Layout};
use crate::bundle::Precision;
use crate::caption::{Captioner, LoadOptions};
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::model::{HostCaptioner, VisionEncoderDecoder};
use crate::preprocess::load_image;
use crate::train::data::load_captions;
use crate::train::metrics::{score, Scores};
use crate::train::trainer::{self, TrainArgs};

#[derive(clap::Args, Debug)]
pub struct TrainAndExportArgs {
    /// Skip training: export this checkpoint folder.
    #[arg(long)]
    pub from_checkpoint: Option<PathBuf>,
    /// Arguments of `vitgpt2-host train`, as one string (when not --from-checkpoint), e.g.
    /// "--train data/synth/captions.json --init-preset tiny --steps 400 --out runs/demo".
    #[arg(long, allow_hyphen_values = true)]
    pub train_args: Option<String>,
    /// With --from-checkpoint: how the checkpoint was trained (e.g. the `train` command lines),
    /// recorded in the manifest next to the checkpoint's trainer_state.json when it has one.
    #[arg(long, requires = "from_checkpoint")]
    pub training_note: Option<String>,
    /// Held-out captions (COCO or flat records) to evaluate on.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long)]
    pub eval_images: Option<PathBuf>,
    /// Evaluate on the first N held-out images.
    #[arg(long, default_value_t = 200)]
    pub eval_limit: usize,
    /// Output bundle folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Ship only the int8 graphs in the bundle (fp32 is still exported, evaluated and removed).
    #[arg(long)]
    pub int8_only: bool,
}

#[derive(Parser)]
struct TrainCli {
    #[command(flatten)]
    args: TrainArgs,
}

/// One stage's progress on stderr: `[name] i/n`, redrawn in place on a terminal; a log file
/// (stderr not a terminal) gets only the final line of each stage.
struct Progress {
    name: String,
    n: usize,
    t0: Instant,
    live: bool,
}

impl Progress {
    fn new(name: &str, n: usize) -> Self {
        let live = std::io::stderr().is_terminal();
        if live {
            eprint!("[{name}] 0/{n}");
        }
        Progress { name: name.into(), n, t0: Instant::now(), live }
    }
    fn tick(&self, i: usize) {
        if self.live {
            self.draw(i);
        }
    }
    fn draw(&self, i: usize) {
        let width = 30;
        let filled = if self.n == 0 { width } else { i * width / self.n };
        eprint!("\r[{}] [{}{}] {i}/{} {:.1}s", self.name, "#".repeat(filled), " ".repeat(width - filled), self.n, self.t0.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
    }
    fn done(self) {
        self.draw(self.n);
        eprintln!();
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub name: String,
    pub scores: Scores,
    /// Mean ms per caption (encoder + decoder, greedy).
    pub mean_ms: f64,
    #[serde(skip)]
    pub tokens: Vec<Vec<u32>>,
}

fn evaluate<F>(name: &str, images: &[(PathBuf, Vec<String>)], mut caption: F) -> Result<EvalReport>
where
    F: FnMut(&image::RgbImage) -> Result<(String, Vec<u32>, f64)>,
{
    let p = Progress::new(name, images.len());
    let (mut hyps, mut refs, mut tokens, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0.0);
    for (i, (path, r)) in images.iter().enumerate() {
        let img = load_image(path)?;
        let (text, toks, ms) = caption(&img)?;
        hyps.push(text);
        refs.push(r.clone());
        tokens.push(toks);
        total += ms;
        p.tick(i + 1);
    }
    p.done();
    let n = images.len().max(1) as f64;
    Ok(EvalReport { name: name.into(), scores: score(&hyps, &refs), mean_ms: total / n, tokens })
}

fn agreement(a: &[Vec<u32>], b: &[Vec<u32>]) -> f64 {
    if a.is_empty() {
        return 1.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

fn greedy(g: &GenerationConfig) -> GenerationConfig {
    GenerationConfig { num_beams: 1, ..g.clone() }
}

/// The `--train-args` string as `vitgpt2-host train`'s arguments.
pub fn parse_train_args(s: &str) -> Result<TrainArgs> {
    let mut argv = vec!["train".to_string()];
    argv.extend(s.split_whitespace().map(String::from));
    TrainCli::try_parse_from(&argv).map(|c| c.args).map_err(|e| Error::setting("--train-args", e.to_string()))
}

pub fn train_and_export(args: &TrainAndExportArgs) -> Result<i32> {
    // 1. Train, or take the checkpoint.
    let (ckpt, trained) = match (&args.from_checkpoint, &args.train_args) {
        (Some(c), _) => {
            let state = std::fs::read_to_string(c.join("trainer_state.json")).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let t = match (&args.training_note, state) {
                (None, None) => Value::Null,
                (note, state) => json!({"note": note, "trainer_state": state}),
            };
            (c.clone(), t)
        }
        (None, Some(s)) => {
            let train_args = parse_train_args(s)?;
            eprintln!("[train] {}", s);
            let summary = trainer::train(&train_args)?;
            let t = json!({"steps": summary.steps, "first_loss": summary.first_loss, "last_loss": summary.last_loss, "args": s});
            (summary.model_dir, t)
        }
        (None, None) => return Err(Error::setting("train-and-export", "pass --from-checkpoint DIR or --train-args \"…\"")),
    };
    // 2. Export fp32 and int8.
    let p = Progress::new("export", 2);
    let (model, _) = VisionEncoderDecoder::from_checkpoint(&ckpt, &Device::Cpu)?;
    let weights = ["model.safetensors", "pytorch_model.bin"].iter().map(|f| ckpt.join(f)).find(|p| p.is_file());
    let tokenizer = ["tokenizer.json", "vocab.json"].iter().map(|f| ckpt.join(f)).find(|p| p.is_file());
    let provenance = json!({
        "model": {
            "checkpoint": ckpt.display().to_string(),
            "weights_sha256": weights.map(|p| sha256_file(&p)).transpose()?,
            "config": model.config_json()?,
            "training": trained,
        },
        "tokenizer": {
            "from": ckpt.display().to_string(),
            "sha256": tokenizer.map(|p| sha256_file(&p)).transpose()?,
        },
        "quantization": "int8 weights per output channel, symmetric; activations int8 per row, symmetric, at run time; LayerNorm, Softmax, GELU and the residual stream f32",
    });
    let opts = ExportOptions { out: args.out.clone(), layout: Layout::Fast, fp32: true, int8: true };
    p.tick(1);
    export_bundle(&model, &ckpt, &opts, provenance)?;
    p.done();
    drop(model);

    // 3. Evaluate candle, tract fp32, tract int8.
    let mut evaluation = Value::Null;
    let mut report_lines = Vec::new();
    if let Some(data) = &args.eval {
        let set = load_captions(data, args.eval_images.as_deref(), "caption")?;
        let mut refs = set.references();
        refs.truncate(args.eval_limit);
        let host = HostCaptioner::load(&ckpt, &Device::Cpu)?;
        let fp32 = Captioner::load(&args.out, &LoadOptions { precision: Precision::Fp32, threads: 1 })?;
        let int8 = Captioner::load(&args.out, &LoadOptions { precision: Precision::Int8, threads: 1 })?;
        let gen = greedy(fp32.generation_config());
        let c = evaluate("candle", &refs, |img| {
            let c = host.caption_image(img, &gen)?;
            Ok((c.caption, c.tokens, c.ms.encoder + c.ms.decoder))
        })?;
        let f = evaluate("tract fp32", &refs, |img| {
            let c = fp32.caption_image(img, &gen)?;
            Ok((c.caption, c.tokens, c.ms.encoder + c.ms.decoder))
        })?;
        let q = evaluate("tract int8", &refs, |img| {
            let c = int8.caption_image(img, &gen)?;
            Ok((c.caption, c.tokens, c.ms.encoder + c.ms.decoder))
        })?;
        let fp32_vs_candle = agreement(&f.tokens, &c.tokens);
        let int8_vs_fp32 = agreement(&q.tokens, &f.tokens);
        let bleu_drop = (f.scores.bleu[3] - q.scores.bleu[3]) * 100.0;
        for r in [&c, &f, &q] {
            report_lines.push(format!(
                "  {:<11} BLEU-4 {:6.2}  CIDEr-D {:6.3}  exact {:5.1}%  {:7.1} ms/caption",
                r.name,
                r.scores.bleu[3] * 100.0,
                r.scores.cider_d,
                r.scores.exact * 100.0,
                r.mean_ms
            ));
        }
        report_lines.push(format!("  greedy tokens: tract fp32 = candle on {:.1}%, int8 = fp32 on {:.1}% ({} images)", fp32_vs_candle * 100.0, int8_vs_fp32 * 100.0, refs.len()));
        report_lines.push(format!("  BLEU-4 drop int8 vs fp32: {bleu_drop:.2} points (target ≤ 1), int8 = fp32 target ≥ 95%"));
        evaluation = json!({
            "data": data.display().to_string(),
            "images": refs.len(),
            "generation": "greedy",
            "candle": c, "tract_fp32": f, "tract_int8": q,
            "parity": {"tract_fp32_equals_candle": fp32_vs_candle, "int8_equals_fp32": int8_vs_fp32, "bleu4_drop_points": bleu_drop},
        });
    }
    // 4. Ship: drop fp32 graphs if asked, record evaluation, sizes and hashes.
    let manifest_path = args.out.join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).map_err(|e| Error::bundle(&manifest_path, e))?)
        .map_err(|e| Error::bundle(&manifest_path, e))?;
    let fp32_bytes: u64 = super::fast_files(super::WeightForm::Fp32).iter().map(|f| file_len(&args.out.join(f))).sum();
    let int8_bytes: u64 = super::fast_files(super::WeightForm::Int8).iter().map(|f| file_len(&args.out.join(f))).sum();
    if args.int8_only {
        for f in super::fast_files(super::WeightForm::Fp32) {
            let _ = std::fs::remove_file(args.out.join(f));
        }
        if let Some(files) = manifest["files"].as_array_mut() {
            files.retain(|f| !super::fast_files(super::WeightForm::Fp32).iter().any(|n| f["file"] == *n));
        }
    }
    manifest["evaluation"] = evaluation;
    manifest["sizes"] = json!({"fp32_graph_bytes": fp32_bytes, "int8_graph_bytes": int8_bytes, "int8_over_fp32": int8_bytes as f64 / fp32_bytes.max(1) as f64});
    manifest["shipped"] = json!(if args.int8_only { "int8" } else { "fp32 + int8" });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n").map_err(|e| Error::bundle(&manifest_path, e))?;

    println!("bundle: {}", args.out.display());
    println!("  graphs: fp32 {:.2} MB, int8 {:.2} MB ({:.1}%)", fp32_bytes as f64 / 1e6, int8_bytes as f64 / 1e6, 100.0 * int8_bytes as f64 / fp32_bytes.max(1) as f64);
    for l in report_lines {
        println!("{l}");
    }
    Ok(0)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
