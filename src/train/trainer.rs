//! The training loop (`vitgpt2-host train`), plain like nanoGPT's train.py: AdamW with weight
//! decay, warmup + linear/cosine decay, global-norm clipping, gradient accumulation, optional
//! frozen encoder; atomic checkpoints with optimizer state and step, from which `--resume`
//! continues exactly (the data order is a function of the seed and the position alone);
//! evaluation (loss, BLEU, ROUGE-L, CIDEr-D) into a JSON-lines log; a progress line; a plot.
//!
//! Exactness of resume: bitwise on CPU when dropout is 0 (the synthetic presets). Dropout
//! draws from candle's generator, which cannot be seeded, so a resumed run with dropout > 0
//! continues with other masks (same data, optimizer and schedule).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::data::{decode_batch, load_captions, CaptionSet, FailureLog, Prefetcher, Sample};
use super::metrics::{score, Scores};
use super::optim::{clip_global_norm, AdamW, Schedule};
use crate::config::{Gpt2Config, ModelConfig, VitConfig};
use crate::error::{Error, Result};
use crate::generate::{generate, EarlyStopping, GenerationConfig};
use crate::model::vit::sincos_position_embeddings;
use crate::model::{caption_loss, shift_tokens_right, VisionEncoderDecoder};
use crate::preprocess::{decode_image, ImageSize, PreprocessConfig};
use crate::tokenizer::CaptionTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Preset {
    /// ViT 64 px, patch 8, width 96, 2 layers + GPT-2 width 96, 2 layers (the synthetic demo).
    Tiny,
    /// ViT 96 px, patch 8, width 192, 4 layers + GPT-2 width 192, 3 layers.
    Small,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum PositionInit {
    Sincos,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Decay {
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Training captions: COCO captions_*.json, or flat records (JSON array or JSON lines).
    #[arg(long)]
    pub train: PathBuf,
    /// Image folder of --train (default: <its folder>/images if present, else its folder).
    #[arg(long)]
    pub train_images: Option<PathBuf>,
    /// Validation captions (default: --val-fraction of the training images, held out).
    #[arg(long)]
    pub val: Option<PathBuf>,
    #[arg(long)]
    pub val_images: Option<PathBuf>,
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// The caption field of the records (`caption`, `fr`, `en`).
    #[arg(long, default_value = "caption")]
    pub caption_field: String,
    /// Decode every image once before training and drop those that fail.
    #[arg(long)]
    pub verify_images: bool,

    /// Start from this checkpoint folder (e.g. made by `vitgpt2-host init --vit --gpt2`).
    #[arg(long, conflicts_with = "init_preset")]
    pub checkpoint: Option<PathBuf>,
    /// Start from a randomly initialised small model instead.
    #[arg(long, value_enum)]
    pub init_preset: Option<Preset>,
    /// With a preset: the encoder's input side in pixels instead of the preset's.
    #[arg(long, requires = "init_preset")]
    pub image_size: Option<usize>,
    /// With a preset: the ViT patch side instead of the preset's.
    #[arg(long, requires = "init_preset")]
    pub patch_size: Option<usize>,
    /// How a preset starts the ViT's learned position embeddings: a 2-D sine-cosine table
    /// (default; lets a small encoder learn where things are), or N(0, 0.02) as `transformers`.
    #[arg(long, value_enum, default_value = "sincos")]
    pub position_init: PositionInit,
    /// Tokenizer folder (tokenizer.json, or vocab.json + merges.txt); default: the
    /// checkpoint's, or a BPE trained on the training captions with a preset.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE of this many ids on the training captions.
    #[arg(long)]
    pub bpe_vocab: Option<usize>,

    /// Output folder: checkpoints/, model/ (final), log.jsonl, plot.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the latest checkpoint in --out (same data and settings).
    #[arg(long)]
    pub resume: bool,
    /// `cpu`, or `cuda` (built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: `f32`, or `bf16` mixed precision (matrix products in bf16; layer norm,
    /// softmax, the loss and the master weights in f32). Meant for CUDA; slow on most CPUs.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ComputeDtype,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Effective batch size (micro-batch × accumulation).
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Micro-batch size; gradients are accumulated over batch_size / micro_batch of them.
    #[arg(long, default_value_t = 32)]
    pub micro_batch: usize,
    /// Optimizer steps (default: --epochs over the training pairs).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 3.0)]
    pub epochs: f64,
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    #[arg(long, value_enum, default_value_t = Decay::Linear)]
    pub decay: Decay,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Train only the decoder (and enc_to_dec_proj).
    #[arg(long)]
    pub freeze_encoder: bool,
    /// Longest label (caption tokens + </s>); longer captions are cut.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,

    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation images captioned (greedy) at each evaluation.
    #[arg(long, default_value_t = 100)]
    pub eval_images: usize,
    /// Validation micro-batches for the validation loss.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Log the training loss every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Stop after this many steps of the run (as if killed after a checkpoint; for tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Image decoding threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Compute threads on the CPU (default: the cores left after --workers, at least 1;
    /// CANDLE_NUM_THREADS / RAYON_NUM_THREADS, when set, win over the default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Micro-batches decoded ahead of the trainer.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// What a checkpoint records besides weights and moments; a resume must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub micro_batch: usize,
    pub accum: usize,
    pub n_train: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub clip: f64,
    pub freeze_encoder: bool,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub final_eval: Option<Scores>,
    pub model_dir: PathBuf,
}

fn rt(stage: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::runtime(stage, e)
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::setting("--out", format!("cannot {what} {}: {e}", path.display()))
}

pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                Device::new_cuda(0).map_err(|e| Error::setting("--device", format!("no CUDA GPU: {e}")))
            }
            #[cfg(not(feature = "cuda"))]
            Err(Error::setting("--device", "cuda needs a build with `--features cuda`"))
        }
        other => Err(Error::setting("--device", format!("`{other}`: use cpu or cuda"))),
    }
}

/// Sizes candle's CPU thread pools; call from `main` before any other thread starts (the pools
/// read CANDLE_NUM_THREADS / RAYON_NUM_THREADS once, at first use). Candle's pool spin-waits at
/// every op's barrier, so compute threads plus decoding workers must not outnumber the cores:
/// on 2 cores with 1 worker, 1 compute thread trained the tiny preset at 82.6 samples/s against
/// 57.2 with candle's default of 2 (debug build; its barrier then spun for 29 % of the samples
/// in `perf`).
pub fn configure_compute_threads(threads: Option<usize>, workers: usize) {
    let preset = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"].iter().any(|v| std::env::var_os(v).is_some());
    if threads.is_none() && preset {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = threads.unwrap_or_else(|| cores.saturating_sub(workers)).max(1).to_string();
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    std::env::set_var("RAYON_NUM_THREADS", &n);
}

/// Keeps glibc malloc from handing freed memory back to the kernel after every op. Candle
/// allocates a fresh tensor per op and frees it soon after; with glibc's defaults the heap top was
/// trimmed and re-faulted all the time (25 % of the training samples in `perf` were page faults,
/// page clearing and `brk`). Retaining up to 1 GB of freed heap: tiny preset 117 -> 160
/// samples/s (release build, 2 cores, these settings). Large blocks (> 32 MB) still go to mmap and back.
/// Skipped when the user set glibc's own MALLOC_*_ variables.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let preset = ["MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some());
        if !preset {
            // SAFETY: mallopt only sets allocator parameters; called from main before other threads.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}

/// A random-initialised model config for a preset (dropout 0, so that resume is exact).
pub fn preset_config(preset: Preset, vocab_size: usize) -> ModelConfig {
    let (image, patch, d, enc_layers, dec_layers) = match preset {
        Preset::Tiny => (64, 8, 96, 2, 2),
        Preset::Small => (96, 8, 192, 4, 3),
    };
    let heads = d / 32;
    let encoder = VitConfig {
        hidden_size: d,
        num_hidden_layers: enc_layers,
        num_attention_heads: heads,
        intermediate_size: 4 * d,
        image_size: image,
        patch_size: patch,
        ..VitConfig::default()
    };
    let decoder = Gpt2Config {
        vocab_size,
        n_positions: 64,
        n_embd: d,
        n_layer: dec_layers,
        n_head: heads,
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Gpt2Config::default()
    };
    ModelConfig {
        model_type: "vision-encoder-decoder".into(),
        encoder,
        decoder,
        decoder_start_token_id: Some(0),
        pad_token_id: Some(1),
        eos_token_id: Some(2),
        tie_word_embeddings: Some(false),
    }
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::setting("json", e))?;
    std::fs::write(path, text + "\n").map_err(|e| io_err(path, "write", e))
}

const ASSETS: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
    "generation_config.json",
];

fn copy_assets(from: &Path, to: &Path) -> Result<()> {
    for name in ASSETS {
        let p = from.join(name);
        if p.is_file() {
            std::fs::copy(&p, to.join(name)).map_err(|e| io_err(&to.join(name), "write", e))?;
        }
    }
    Ok(())
}

/// Writes `dir` atomically: fills `<dir's parent>/.tmp-<name>` with `fill`, then renames it.
fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, "remove", e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
    fill(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(|e| io_err(&tmp, "read", e))?.flatten() {
        if let Ok(f) = std::fs::File::open(entry.path()) {
            f.sync_all().ok();
        }
    }
    if dir.exists() {
        let old = parent.join(format!(".old-{name}"));
        std::fs::remove_dir_all(&old).ok();
        std::fs::rename(dir, &old).map_err(|e| io_err(dir, "replace", e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, "write", e))?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, "write", e))?;
    }
    Ok(())
}

fn write_file_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| io_err(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, "write", e))
}

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The latest complete checkpoint of `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let dir = checkpoints_dir(out);
    let name = std::fs::read_to_string(dir.join("latest")).ok()?;
    let p = dir.join(name.trim());
    p.join("trainer_state.json").is_file().then_some(p)
}

fn save_checkpoint(out: &Path, model: &VisionEncoderDecoder, opt: &AdamW, state: &TrainerState, assets: &Path, keep: usize) -> Result<PathBuf> {
    let dir = checkpoints_dir(out);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create", e))?;
    let name = format!("step-{:07}", state.step);
    let path = dir.join(&name);
    write_dir_atomic(&path, |tmp| {
        model.save(tmp)?;
        copy_assets(assets, tmp)?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        write_json(&tmp.join("trainer_state.json"), state)
    })?;
    write_file_atomic(&dir.join("latest"), &name)?;
    // Keep the newest `keep` checkpoints.
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-"))).collect())
        .unwrap_or_default();
    steps.sort();
    if steps.len() > keep {
        for p in &steps[..steps.len() - keep] {
            std::fs::remove_dir_all(p).ok();
        }
    }
    Ok(path)
}

/// Labels for `rows`: caption tokens (cut to `max - 1`) then `</s>`, padded with -100.
pub fn make_labels(tokens: &[Vec<u32>], rows: &[usize], eos: u32, max: usize) -> Vec<Vec<i64>> {
    let mut out: Vec<Vec<i64>> = rows
        .iter()
        .map(|&i| {
            let t = &tokens[i];
            let mut l: Vec<i64> = t.iter().take(max.saturating_sub(1)).map(|&x| x as i64).collect();
            l.push(eos as i64);
            l
        })
        .collect();
    let len = out.iter().map(|l| l.len()).max().unwrap_or(0);
    for l in &mut out {
        l.resize(len, -100);
    }
    out
}

/// Mean token cross-entropy of one micro-batch.
pub fn batch_loss(model: &VisionEncoderDecoder, pixels: Tensor, labels: &[Vec<i64>], train: bool, freeze_encoder: bool) -> Result<Tensor> {
    let c = &model.config;
    let start = c.decoder_start_token_id.or(c.decoder.bos_token_id).unwrap_or(0);
    let pad = c.pad_token_id.or(c.decoder.pad_token_id).or(c.eos_token_id).unwrap_or(1);
    let inputs = shift_tokens_right(labels, start, pad).map_err(rt("labels"))?;
    let (b, t) = (labels.len(), labels.first().map_or(0, |l| l.len()));
    let dev = model.device();
    let run = || -> candle_core::Result<Tensor> {
        let ids = Tensor::from_vec(inputs.concat(), (b, t), dev)?;
        let lab = Tensor::from_vec(labels.concat(), (b, t), dev)?;
        let logits = if freeze_encoder { model.forward_frozen_encoder(&pixels, &ids, train)? } else { model.forward(&pixels, &ids, train)? };
        caption_loss(&logits, &lab)
    };
    run().map_err(rt("training step"))
}

fn pixels_tensor(pixels: Vec<f32>, rows: usize, pre: &PreprocessConfig, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(pixels, (rows, 3, pre.size.height, pre.size.width), dev).map_err(rt("batch"))
}

/// Everything an evaluation needs.
pub struct EvalSet {
    pub samples: Vec<Sample>,
    pub tokens: Vec<Vec<u32>>,
    pub refs: Vec<(PathBuf, Vec<String>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub val_loss: f64,
    pub scores: Scores,
    pub examples: Vec<(String, Vec<String>)>,
}

pub fn greedy_config(model: &ModelConfig, max_length: usize) -> GenerationConfig {
    GenerationConfig {
        max_length,
        min_length: 0,
        num_beams: 1,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Bool(false),
        no_repeat_ngram_size: 0,
        decoder_start_token_id: model.decoder_start_token_id.unwrap_or(0),
        eos_token_ids: vec![model.eos_token_id.unwrap_or(2)],
        pad_token_id: model.pad_token_id.unwrap_or(1),
    }
}

/// Captions one image file with the model (the product's decoding and preprocessing).
pub fn caption_file(model: &VisionEncoderDecoder, tok: &CaptionTokenizer, pre: &PreprocessConfig, gen: &GenerationConfig, path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    let img = decode_image(&bytes).map_err(|m| Error::image(path, m))?;
    let px = pre.pixel_values(&img);
    let shape = px.shape().to_vec();
    let x = Tensor::from_vec(px.into_iter().collect::<Vec<f32>>(), shape, model.device()).map_err(rt("candle encoder"))?;
    let enc = model.encode(&x, false).map_err(rt("candle encoder"))?;
    let g = generate(gen, |rows| model.session(&enc, rows).map_err(|e| Error::runtime("candle decoder", e)))?;
    tok.decode(&g.tokens)
}

pub fn evaluate(model: &VisionEncoderDecoder, tok: &CaptionTokenizer, pre: &PreprocessConfig, set: &EvalSet, args: &TrainArgs, eos: u32) -> Result<EvalResult> {
    // Validation loss over the first eval_batches micro-batches, in file order.
    let mut total = 0.0;
    let mut count = 0usize;
    let n = set.samples.len().min(args.eval_batches * args.micro_batch);
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(args.micro_batch.max(1)) {
        let batch = decode_batch(&set.samples, chunk, pre, args.workers);
        if batch.rows.is_empty() {
            continue;
        }
        let labels = make_labels(&set.tokens, &batch.rows, eos, args.max_tokens);
        let px = pixels_tensor(batch.pixels, batch.rows.len(), pre, model.device())?;
        let loss = batch_loss(model, px, &labels, false, false)?;
        total += loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(rt("eval"))? * batch.rows.len() as f64;
        count += batch.rows.len();
    }
    let gen = greedy_config(&model.config, args.max_tokens + 1);
    let mut hyps = Vec::new();
    let mut refs = Vec::new();
    for (path, r) in set.refs.iter().take(args.eval_images) {
        match caption_file(model, tok, pre, &gen, path) {
            Ok(h) => {
                hyps.push(h);
                refs.push(r.clone());
            }
            Err(e) => eprintln!("\nwarning: {e}"),
        }
    }
    let scores = score(&hyps, &refs);
    let examples = hyps.iter().cloned().zip(refs.iter().cloned()).take(4).collect();
    Ok(EvalResult { val_loss: if count > 0 { total / count as f64 } else { f64::NAN }, scores, examples })
}

/// One line of progress on stderr (redrawn in place on a terminal).
struct Progress {
    start: Instant,
    first_step: u64,
    total: u64,
    tty: bool,
    last: Instant,
}

impl Progress {
    fn update(&mut self, step: u64, loss: f64, samples_per_s: f64, lr: f64) {
        let done = step - self.first_step;
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 { elapsed / done as f64 * (self.total - step) as f64 } else { 0.0 };
        let width = 30;
        let filled = (step as f64 / self.total.max(1) as f64 * width as f64) as usize;
        let bar: String = (0..width).map(|i| if i < filled { '#' } else { '-' }).collect();
        let line = format!(
            "[{bar}] {step}/{} loss {loss:.4} lr {lr:.2e} {samples_per_s:.1} samples/s ETA {}:{:02}",
            self.total,
            (eta / 60.0) as u64,
            (eta % 60.0) as u64
        );
        if self.tty {
            eprint!("\r{line}  ");
        } else if self.last.elapsed().as_secs_f64() > 30.0 || step == self.total {
            eprintln!("{line}");
            self.last = Instant::now();
        }
    }
}

fn append_log(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_err(path, "write", e))?;
    writeln!(f, "{v}").map_err(|e| io_err(path, "write", e))
}

/// Keeps the log lines up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s <= step))
        .collect();
    write_file_atomic(path, &(kept.join("\n") + if kept.is_empty() { "" } else { "\n" }))
}

fn load_sets(args: &TrainArgs) -> Result<(CaptionSet, CaptionSet)> {
    let train = load_captions(&args.train, args.train_images.as_deref(), &args.caption_field)?;
    let (mut train, mut val) = match &args.val {
        Some(v) => (train, load_captions(v, args.val_images.as_deref(), &args.caption_field)?),
        None => train.split(args.val_fraction),
    };
    if let Some(r) = train.skip_report("training captions") {
        eprintln!("{r}");
    }
    if let Some(r) = val.skip_report("validation captions") {
        eprintln!("{r}");
    }
    if args.verify_images {
        let a = train.verify_images(args.workers);
        let b = val.verify_images(args.workers);
        eprintln!("verified images: {a} training and {b} validation image(s) dropped");
    }
    if train.samples.is_empty() {
        return Err(Error::setting("--train", "no training pairs left"));
    }
    Ok((train, val))
}

fn encode_all(tok: &CaptionTokenizer, samples: &[Sample]) -> Result<Vec<Vec<u32>>> {
    samples.iter().map(|s| tok.encode(&s.caption)).collect()
}

/// `vitgpt2-host train`.
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    if args.micro_batch == 0 || !args.batch_size.is_multiple_of(args.micro_batch) {
        return Err(Error::setting("--batch-size", format!("{} is not a multiple of --micro-batch {}", args.batch_size, args.micro_batch)));
    }
    let accum = args.batch_size / args.micro_batch;
    let device = select_device(&args.device)?;
    let out = &args.out;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, "create", e))?;
    let assets = out.join("assets");
    let log_path = out.join("log.jsonl");
    let (train_set, val_set) = load_sets(args)?;
    eprintln!("data: {} training pairs, {} validation pairs ({} images)", train_set.samples.len(), val_set.samples.len(), val_set.references().len());

    let resume_from = if args.resume { latest_checkpoint(out) } else { None };
    if !args.resume && latest_checkpoint(out).is_some() {
        return Err(Error::setting("--out", format!("{} already has checkpoints: pass --resume to continue, or another --out", out.display())));
    }

    // Model, tokenizer, preprocessing.
    let (model, tok, pre, state0) = if let Some(ck) = &resume_from {
        let (model, _) = VisionEncoderDecoder::from_checkpoint(ck, &device)?;
        let tok = CaptionTokenizer::from_dir(ck, &[])?;
        let pre = PreprocessConfig::from_file(&ck.join("preprocessor_config.json"))?;
        let text = std::fs::read_to_string(ck.join("trainer_state.json")).map_err(|e| io_err(ck, "read", e))?;
        let st: TrainerState = serde_json::from_str(&text).map_err(|e| Error::bundle(ck.join("trainer_state.json"), e))?;
        eprintln!("resuming from {} (step {})", ck.display(), st.step);
        (model, tok, pre, Some(st))
    } else {
        if assets.exists() {
            std::fs::remove_dir_all(&assets).map_err(|e| io_err(&assets, "remove", e))?;
        }
        std::fs::create_dir_all(&assets).map_err(|e| io_err(&assets, "create", e))?;
        std::fs::remove_file(&log_path).ok();
        // Tokenizer.
        if let Some(n) = args.bpe_vocab.or(if args.tokenizer.is_none() && args.checkpoint.is_none() { Some(512) } else { None }) {
            let caps: Vec<String> = train_set.samples.iter().map(|s| s.caption.clone()).collect();
            super::tokenizer::train_bpe(&caps, n, &assets)?;
            eprintln!("trained a byte-level BPE of {n} ids on {} captions", caps.len());
        } else {
            let from = args.tokenizer.as_ref().or(args.checkpoint.as_ref()).map(|p| p.to_path_buf()).unwrap_or_default();
            for name in &ASSETS[..6] {
                let p = from.join(name);
                if p.is_file() {
                    std::fs::copy(&p, assets.join(name)).map_err(|e| io_err(&assets, "write", e))?;
                }
            }
        }
        let tok = CaptionTokenizer::from_dir(&assets, &[])?;
        let (model, pre) = match (&args.checkpoint, args.init_preset) {
            (Some(ck), _) => {
                let (m, report) = VisionEncoderDecoder::from_checkpoint(ck, &device)?;
                eprintln!("model: {} ({} tensors)", ck.display(), report.loaded.len());
                let pp = ck.join("preprocessor_config.json");
                let pre = if pp.is_file() { PreprocessConfig::from_file(&pp)? } else { default_pre(m.config.encoder.image_size) };
                let g = ck.join("generation_config.json");
                if g.is_file() {
                    std::fs::copy(&g, assets.join("generation_config.json")).map_err(|e| io_err(&assets, "write", e))?;
                }
                (m, pre)
            }
            (None, Some(p)) => {
                let mut cfg = preset_config(p, tok.vocab_size());
                cfg.encoder.image_size = args.image_size.unwrap_or(cfg.encoder.image_size);
                cfg.encoder.patch_size = args.patch_size.unwrap_or(cfg.encoder.patch_size);
                cfg.validate().map_err(|m| Error::setting("--image-size/--patch-size", m))?;
                let m = VisionEncoderDecoder::random_init(&cfg, args.seed, &device)?;
                if args.position_init == PositionInit::Sincos {
                    sincos_position_embeddings(&cfg.encoder)
                        .and_then(|t| m.set_param("encoder.embeddings.position_embeddings", &t))
                        .map_err(|e| Error::runtime("position embeddings", e))?;
                }
                let n: usize = m.params().values().map(|v| v.elem_count()).sum();
                eprintln!("model: random {p:?} preset, {:.2} M parameters", n as f64 / 1e6);
                (m, default_pre(cfg.encoder.image_size))
            }
            (None, None) => return Err(Error::setting("--checkpoint", "give a starting checkpoint (--checkpoint DIR) or --init-preset tiny")),
        };
        write_json(&assets.join("preprocessor_config.json"), &pre)?;
        if !assets.join("generation_config.json").is_file() {
            let c = &model.config;
            let gen = serde_json::json!({
                "decoder_start_token_id": c.decoder_start_token_id, "bos_token_id": c.decoder.bos_token_id,
                "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                "max_length": args.max_tokens + 1, "num_beams": 1,
            });
            write_json(&assets.join("generation_config.json"), &gen)?;
        }
        (model, tok, pre, None)
    };
    if tok.vocab_size() > model.config.decoder.vocab_size {
        return Err(Error::setting("--tokenizer", format!("{} ids but the model has {}: use the model's tokenizer", tok.vocab_size(), model.config.decoder.vocab_size)));
    }
    if pre.size.height != model.config.encoder.image_size {
        return Err(Error::setting("preprocessor", format!("size {} differs from the model's image_size {}", pre.size.height, model.config.encoder.image_size)));
    }
    let eos = model.config.eos_token_id.or(model.config.decoder.eos_token_id).unwrap_or(2);

    let train_tokens = encode_all(&tok, &train_set.samples)?;
    let eval_set = EvalSet { tokens: encode_all(&tok, &val_set.samples)?, refs: val_set.references(), samples: val_set.samples };
    let n_train = train_set.samples.len();
    let total_steps = args.steps.unwrap_or_else(|| ((args.epochs * n_train as f64) / args.batch_size as f64).ceil().max(1.0) as u64);
    let mut state = TrainerState {
        step: 0,
        total_steps,
        seed: args.seed,
        micro_batch: args.micro_batch,
        accum,
        n_train,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        decay: args.decay,
        weight_decay: args.weight_decay,
        clip: args.clip,
        freeze_encoder: args.freeze_encoder,
        max_tokens: args.max_tokens,
    };
    let params: Vec<(String, candle_core::Var)> = {
        let trainable: std::collections::HashSet<String> = model
            .params()
            .keys()
            .filter(|n| !n.starts_with("encoder.pooler.") && (!args.freeze_encoder || !n.starts_with("encoder.")))
            .cloned()
            .collect();
        model.params().iter().filter(|(n, _)| trainable.contains(*n)).map(|(n, v)| (n.clone(), v.clone())).collect()
    };
    let mut opt = AdamW::new(params, args.weight_decay, args.beta1, args.beta2, args.adam_eps)?;
    if let (Some(ck), Some(st)) = (&resume_from, &state0) {
        let mut expect = state.clone();
        expect.step = st.step;
        if &expect != st {
            return Err(Error::setting("--resume", format!("the settings or data differ from the checkpoint's ({}); resume with the same arguments", diff_state(st, &expect))));
        }
        opt.load(&ck.join("optimizer.safetensors"), st.step)?;
        state.step = st.step;
        truncate_log(&log_path, st.step)?;
    }
    let sched = Schedule { lr: args.lr, min_lr: args.min_lr, warmup: args.warmup_steps, total: total_steps, cosine: args.decay == Decay::Cosine };

    let prefetch = Prefetcher::start(Arc::new(train_set.samples), args.seed, args.micro_batch, state.step * accum as u64, pre.clone(), args.workers, args.prefetch);
    let mut failures = FailureLog::default();
    let mut summary = TrainSummary { model_dir: out.join("model"), ..Default::default() };
    let first_step = state.step;
    let stop_at = args.stop_after.map(|k| (first_step + k).min(total_steps)).unwrap_or(total_steps);
    let mut progress = Progress { start: Instant::now(), first_step, total: total_steps, tty: std::io::stderr().is_terminal() && !args.quiet, last: Instant::now() };
    let t_run = Instant::now();
    let mut window = (0.0f64, 0usize, Instant::now());
    eprintln!("training {} steps from step {first_step} (batch {} = {} × {accum}), on {:?}", total_steps, args.batch_size, args.micro_batch, device);
    while state.step < stop_at {
        let step = state.step;
        let lr = sched.at(step);
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.params.len()];
        let mut loss_sum = 0.0;
        let mut micro_done = 0;
        let mut rows = 0;
        // bf16: a fresh view of the f32 master weights for this step (the last step moved them).
        let view = match args.dtype {
            ComputeDtype::F32 => None,
            ComputeDtype::Bf16 => Some(model.compute_view(DType::BF16).map_err(rt("bf16 weights"))?),
        };
        for _ in 0..accum {
            let batch = prefetch.next()?;
            failures.report(&batch.failed);
            if batch.rows.is_empty() {
                continue;
            }
            let labels = make_labels(&train_tokens, &batch.rows, eos, args.max_tokens);
            rows += batch.rows.len();
            let px = pixels_tensor(batch.pixels, batch.rows.len(), &pre, &device)?;
            let loss = match &view {
                None => batch_loss(&model, px, &labels, true, args.freeze_encoder)?,
                Some(v) => batch_loss(v, px.to_dtype(DType::BF16).map_err(rt("batch"))?, &labels, true, args.freeze_encoder)?,
            };
            let g = (&loss / accum as f64).and_then(|l| l.backward()).map_err(rt("backward"))?;
            for (i, (_, var, _)) in opt.params.iter().enumerate() {
                if let Some(gi) = g.get(var) {
                    // Detached: a gradient carries the graph of the step that made it.
                    let gi = gi.detach();
                    grads[i] = Some(match grads[i].take() {
                        Some(a) => (a + gi).map_err(rt("backward"))?,
                        None => gi,
                    });
                }
            }
            loss_sum += loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(rt("loss"))?;
            micro_done += 1;
        }
        if micro_done == 0 {
            eprintln!("\nwarning: step {step}: no image of the batch decoded; skipped");
            state.step += 1;
            continue;
        }
        let loss = loss_sum / micro_done as f64;
        if !loss.is_finite() {
            return Err(Error::runtime("training", format!("loss is {loss} at step {step}: lower --lr or check the data")));
        }
        let norm = clip_global_norm(&mut grads, args.clip)?;
        opt.step(&grads, lr)?;
        state.step += 1;
        summary.first_loss.get_or_insert(loss);
        summary.last_loss = Some(loss);
        window.0 += loss;
        window.1 += rows;
        let sps = window.1 as f64 / window.2.elapsed().as_secs_f64().max(1e-9);
        if !args.quiet {
            progress.update(state.step, loss, sps, lr);
        }
        if state.step.is_multiple_of(args.log_every.max(1)) || state.step == stop_at {
            append_log(&log_path, &serde_json::json!({"step": state.step, "kind": "train", "loss": loss, "lr": lr, "grad_norm": norm, "samples_per_s": sps, "elapsed_s": t_run.elapsed().as_secs_f64()}))?;
            window = (0.0, 0, Instant::now());
        }
        let last = state.step == total_steps;
        let eval_now = last || (args.eval_every > 0 && state.step.is_multiple_of(args.eval_every));
        if eval_now && !eval_set.samples.is_empty() {
            {
                let r = evaluate(&model, &tok, &pre, &eval_set, args, eos)?;
                log_eval(&log_path, state.step, &r)?;
                if !args.quiet {
                    eprintln!(
                        "\nstep {}: val loss {:.4}, BLEU-4 {:.3}, ROUGE-L {:.3}, CIDEr-D {:.3}, exact {:.1}% — « {} »",
                        state.step,
                        r.val_loss,
                        r.scores.bleu[3],
                        r.scores.rouge_l,
                        r.scores.cider_d,
                        100.0 * r.scores.exact,
                        r.examples.first().map(|e| e.0.as_str()).unwrap_or("")
                    );
                }
                if last {
                    summary.final_eval = Some(r.scores);
                }
            }
        }
        if (args.save_every > 0 && state.step.is_multiple_of(args.save_every)) || state.step == stop_at {
            save_checkpoint(out, &model, &opt, &state, &assets, 2)?;
        }
    }
    if !args.quiet && progress.tty {
        eprintln!();
    }
    summary.steps = state.step;
    if state.step == total_steps {
        write_dir_atomic(&out.join("model"), |tmp| {
            model.save(tmp)?;
            copy_assets(&assets, tmp)
        })?;
        match super::plot::plot_log(&log_path, &out.join("plot.png")) {
            Ok(()) => {}
            Err(e) => eprintln!("warning: no plot: {e}"),
        }
        eprintln!("saved the trained model to {}", out.join("model").display());
    }
    Ok(summary)
}

fn log_eval(path: &Path, step: u64, r: &EvalResult) -> Result<()> {
    let s = &r.scores;
    append_log(
        path,
        &serde_json::json!({
            "step": step, "kind": "eval", "val_loss": r.val_loss,
            "bleu1": s.bleu[0], "bleu2": s.bleu[1], "bleu3": s.bleu[2], "bleu4": s.bleu[3],
            "rouge_l": s.rouge_l, "cider_d": s.cider_d, "exact": s.exact, "n": s.n,
            "examples": r.examples,
        }),
    )
}

fn diff_state(a: &TrainerState, b: &TrainerState) -> String {
    let (va, vb) = (serde_json::to_value(a).unwrap_or_default(), serde_json::to_value(b).unwrap_or_default());
    let mut d = Vec::new();
    if let (Some(oa), Some(ob)) = (va.as_object(), vb.as_object()) {
        for (k, x) in oa {
            if ob.get(k) != Some(x) {
                d.push(format!("{k}: checkpoint {x}, now {}", ob.get(k).cloned().unwrap_or_default()));
            }
        }
    }
    d.join(", ")
}

pub fn default_pre(side: usize) -> PreprocessConfig {
    PreprocessConfig { size: ImageSize { height: side, width: side }, ..PreprocessConfig::default() }
}
