//! `vitgpt2-host train-and-export`: train (or take a checkpoint), export fp32 and int8
//! fast-layout graphs, evaluate candle, tract fp32 and tract int8 on a held-out set (scores,
//! latency, token parity) through the one captioner, and record it all in the bundle's
//! manifest.json.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::{json, Value};

use super::{export_bundle, fast_files, sha256_file, ExportOptions, Layout, WeightForm};
use crate::bundle::{contract, Dtype, DtypeChoice};
use crate::error::{write_json, Error, Result};
use crate::generate::GenerationConfig;
use crate::model::{open_checkpoint, VisionEncoderDecoder};
use crate::runtime::{self, LoadOptions};
use crate::train::data::load_captions;
use crate::train::eval::{caption_set, Evaluation};
use crate::train::options::TrainOptions;
use crate::train::progress::Progress;
use crate::train::trainer;

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum PipelineSource {
    /// Skip training: export this checkpoint folder; `note` says how it was trained (recorded in
    /// the manifest next to the checkpoint's trainer_state.json when it has one).
    Checkpoint { dir: PathBuf, note: Option<String> },
    /// Train first with these options; `command_line` is how they were given (for the manifest).
    Train { options: Box<TrainOptions>, command_line: String },
}

/// `vitgpt2-host train-and-export`.
#[derive(Debug, Clone)]
pub struct TrainAndExportOptions {
    pub source: PipelineSource,
    /// Held-out captions (COCO or flat records) to evaluate on.
    pub eval: Option<PathBuf>,
    pub eval_images: Option<PathBuf>,
    /// Evaluate on the first N held-out images.
    pub eval_limit: usize,
    /// Output bundle folder.
    pub out: PathBuf,
    /// Ship only the int8 graphs in the bundle (fp32 is still exported, evaluated and removed).
    pub int8_only: bool,
    /// int8 weights in 7 bits ([`WeightForm::Int8`]'s `reduce_range`).
    pub reduce_range: bool,
}

/// Share of images whose generated ids are the same in both evaluations (over the images both
/// captioned).
fn agreement(a: &Evaluation, b: &Evaluation) -> f64 {
    let both: Vec<bool> = a.captions.iter().filter_map(|c| b.tokens_of(&c.0).map(|t| t == c.3.as_slice())).collect();
    if both.is_empty() {
        return 1.0;
    }
    both.iter().filter(|&&x| x).count() as f64 / both.len() as f64
}

/// Returns 0, or 1 when held-out images could not be read (reported and skipped).
pub fn train_and_export(args: &TrainAndExportOptions) -> Result<i32> {
    // 1. Train, or take the checkpoint.
    let (ckpt, trained) = match &args.source {
        PipelineSource::Checkpoint { dir, note } => {
            let state = std::fs::read_to_string(dir.join("trainer_state.json")).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let t = match (note, state) {
                (None, None) => Value::Null,
                (note, state) => json!({"note": note, "trainer_state": state}),
            };
            (dir.clone(), t)
        }
        PipelineSource::Train { options, command_line } => {
            eprintln!("[train] {command_line}");
            let summary = trainer::train(options)?;
            let t = json!({"steps": summary.steps, "first_loss": summary.first_loss, "last_loss": summary.last_loss, "args": command_line});
            (summary.model_dir, t)
        }
    };
    // 2. Export fp32 and int8.
    let mut p = Progress::new("export", 2, false);
    let (model, report) = VisionEncoderDecoder::from_checkpoint(&ckpt, &Device::Cpu)?;
    let tokenizer = [contract::TOKENIZER_JSON, contract::VOCAB_JSON].iter().map(|f| ckpt.join(f)).find(|p| p.is_file());
    let provenance = json!({
        "model": {
            "checkpoint": ckpt.display().to_string(),
            "weights_sha256": report.files.first().map(|p| sha256_file(p)).transpose()?,
            "config": model.config_json()?,
            "training": trained,
        },
        "tokenizer": {
            "from": ckpt.display().to_string(),
            "sha256": tokenizer.map(|p| sha256_file(&p)).transpose()?,
        },
        "quantization": format!("int8 weights per output channel, symmetric{}; activations int8 per row, symmetric, at run time; LayerNorm, Softmax, GELU and the residual stream f32", if args.reduce_range { ", 7-bit (reduce_range)" } else { "" }),
    });
    let opts = ExportOptions { out: args.out.clone(), layout: Layout::Fast, fp32: true, int8: true, reduce_range: args.reduce_range };
    p.update(1, String::new());
    export_bundle(&model, &ckpt, &opts, provenance)?;
    p.finish(String::new());
    drop(model);

    // 3. Evaluate candle, tract fp32, tract int8 through the same captioner pipeline.
    let mut evaluation = Value::Null;
    let mut report_lines = Vec::new();
    let mut failed = 0;
    if let Some(data) = &args.eval {
        let set = load_captions(data, args.eval_images.as_deref(), "caption")?;
        let mut refs = set.references();
        refs.truncate(args.eval_limit);
        let host = open_checkpoint(&ckpt, &Device::Cpu)?;
        let fp32 = runtime::open(&args.out, &LoadOptions { dtype: DtypeChoice::Exactly(Dtype::Fp32), layout: None, threads: 1 })?;
        let int8 = runtime::open(&args.out, &LoadOptions { dtype: DtypeChoice::Exactly(Dtype::Int8), layout: None, threads: 1 })?;
        let gen = GenerationConfig { num_beams: 1, ..fp32.generation_config().clone() };
        let c = caption_set("candle", &host, &refs, &gen, false)?;
        let f = caption_set("tract fp32", &fp32, &refs, &gen, false)?;
        let q = caption_set("tract int8", &int8, &refs, &gen, false)?;
        failed = c.failed.max(f.failed).max(q.failed);
        let fp32_vs_candle = agreement(&f, &c);
        let int8_vs_fp32 = agreement(&q, &f);
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
            "failed": failed,
            "generation": "greedy",
            "candle": c, "tract_fp32": f, "tract_int8": q,
            "parity": {"tract_fp32_equals_candle": fp32_vs_candle, "int8_equals_fp32": int8_vs_fp32, "bleu4_drop_points": bleu_drop},
        });
    }
    // 4. Ship: drop fp32 graphs if asked, record evaluation, sizes and hashes.
    let manifest_path = args.out.join(contract::MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, "read", e))?;
    let mut manifest: Value = serde_json::from_str(&text).map_err(|e| Error::bundle(&manifest_path, e))?;
    let graph_bytes = |form| fast_files(form).iter().map(|f| file_len(&args.out.join(f))).sum::<u64>();
    let (fp32_bytes, int8_bytes) = (graph_bytes(WeightForm::Fp32), graph_bytes(WeightForm::INT8));
    if args.int8_only {
        let fp32_files = fast_files(WeightForm::Fp32);
        for f in &fp32_files {
            let path = args.out.join(f);
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
        }
        if let Some(files) = manifest["files"].as_array_mut() {
            files.retain(|f| !fp32_files.iter().any(|n| f["file"] == *n));
        }
    }
    manifest["evaluation"] = evaluation;
    manifest["sizes"] = json!({"fp32_graph_bytes": fp32_bytes, "int8_graph_bytes": int8_bytes, "int8_over_fp32": int8_bytes as f64 / fp32_bytes.max(1) as f64});
    manifest["shipped"] = json!(if args.int8_only { "int8" } else { "fp32 + int8" });
    write_json(&manifest_path, &manifest)?;

    println!("bundle: {}", args.out.display());
    println!("  graphs: fp32 {:.2} MB, int8 {:.2} MB ({:.1}%)", fp32_bytes as f64 / 1e6, int8_bytes as f64 / 1e6, 100.0 * int8_bytes as f64 / fp32_bytes.max(1) as f64);
    for l in report_lines {
        println!("{l}");
    }
    Ok(i32::from(failed > 0))
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
