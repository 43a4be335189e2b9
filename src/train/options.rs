//! What `vitgpt2-host train` is asked to do: the options (plain data; the binary's flags map onto
//! them one to one) and the state a checkpoint records so that a resume can be checked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Model sizes to train from scratch (`--init-preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    /// ViT 64 px, patch 8, width 96, 2 layers + GPT-2 width 96, 2 layers (the synthetic demo).
    Tiny,
    /// ViT 96 px, patch 8, width 192, 4 layers + GPT-2 width 192, 3 layers.
    Small,
}
word_enum!(Preset { Tiny = "tiny", Small = "small" });

/// Compute precision (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ComputeDtype {
    F32,
    /// Mixed precision: matrix products in bf16; layer norm, softmax, the loss and the master
    /// weights in f32.
    Bf16,
}
word_enum!(ComputeDtype { F32 = "f32", Bf16 = "bf16" });

/// How a preset starts the ViT's learned position embeddings (`--position-init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PositionInit {
    /// A 2-D sine-cosine table: lets a small encoder learn where things are.
    Sincos,
    /// N(0, 0.02), as `transformers`.
    Random,
}
word_enum!(PositionInit { Sincos = "sincos", Random = "random" });

/// Learning-rate decay after warmup (`--decay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decay {
    Linear,
    Cosine,
}
word_enum!(Decay { Linear = "linear", Cosine = "cosine" });

/// `vitgpt2-host train`. Defaults are the binary's; see its `--help` for each field.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Training captions: COCO captions_*.json, or flat records (JSON array or JSON lines).
    pub train: PathBuf,
    /// Image folder of `train` (default: <its folder>/images if present, else its folder).
    pub train_images: Option<PathBuf>,
    /// Validation captions (default: `val_fraction` of the training images, held out).
    pub val: Option<PathBuf>,
    pub val_images: Option<PathBuf>,
    pub val_fraction: f64,
    /// The caption field of the records (`caption`, `fr`, `en`).
    pub caption_field: String,
    /// Decode every image once before training and drop those that fail.
    pub verify_images: bool,
    /// Start from this checkpoint folder.
    pub checkpoint: Option<PathBuf>,
    /// Start from a randomly initialised model of this size instead.
    pub init_preset: Option<Preset>,
    /// With a preset: the encoder's input side in pixels, and its patch side.
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub position_init: PositionInit,
    /// Tokenizer folder; default: the checkpoint's, or a BPE trained on the training captions.
    pub tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE of this many ids on the training captions.
    pub bpe_vocab: Option<usize>,
    /// Output folder: checkpoints/, model/ (final), log.jsonl, plot.png.
    pub out: PathBuf,
    /// Continue from the latest checkpoint in `out` (same data and settings).
    pub resume: bool,
    /// `cpu`, or `cuda` (built with the `cuda` feature).
    pub device: String,
    pub dtype: ComputeDtype,
    pub seed: u64,
    /// Effective batch size (micro-batch × accumulation).
    pub batch_size: usize,
    pub micro_batch: usize,
    /// Optimizer steps (default: `epochs` over the training pairs).
    pub steps: Option<u64>,
    pub epochs: f64,
    pub lr: f64,
    pub min_lr: f64,
    pub decay: Decay,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm (0: off).
    pub clip: f64,
    /// Train only the decoder (and enc_to_dec_proj).
    pub freeze_encoder: bool,
    /// Longest label (caption tokens + the end-of-sequence token); longer captions are cut.
    pub max_tokens: usize,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Validation images captioned (greedy) at each evaluation.
    pub eval_images: usize,
    /// Validation micro-batches for the validation loss.
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// Log the training loss every N steps.
    pub log_every: u64,
    /// Stop after this many steps of the run (as if killed after a checkpoint; for tests).
    pub stop_after: Option<u64>,
    /// Image decoding threads.
    pub workers: usize,
    /// Compute threads on the CPU (default: the cores left after `workers`, at least 1).
    pub threads: Option<usize>,
    /// Micro-batches decoded ahead of the trainer.
    pub prefetch: usize,
    /// No progress line.
    pub quiet: bool,
}

impl TrainOptions {
    /// The defaults of `vitgpt2-host train` (its flags take theirs from here), training on the
    /// captions `train` into `out`: fine-tuning settings (lr 5e-5, batch 256 in micro-batches of
    /// 32, 3 epochs), as the original recipe.
    pub fn new(train: PathBuf, out: PathBuf) -> Self {
        TrainOptions {
            train,
            train_images: None,
            val: None,
            val_images: None,
            val_fraction: 0.05,
            caption_field: "caption".into(),
            verify_images: false,
            checkpoint: None,
            init_preset: None,
            image_size: None,
            patch_size: None,
            position_init: PositionInit::Sincos,
            tokenizer: None,
            bpe_vocab: None,
            out,
            resume: false,
            device: "cpu".into(),
            dtype: ComputeDtype::F32,
            seed: 42,
            batch_size: 256,
            micro_batch: 32,
            steps: None,
            epochs: 3.0,
            lr: 5e-5,
            min_lr: 0.0,
            decay: Decay::Linear,
            warmup_steps: 0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            clip: 1.0,
            freeze_encoder: false,
            max_tokens: 48,
            eval_every: 0,
            eval_images: 100,
            eval_batches: 8,
            save_every: 500,
            log_every: 10,
            stop_after: None,
            workers: 2,
            threads: None,
            prefetch: 4,
            quiet: false,
        }
    }
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

impl TrainerState {
    /// The settings that differ from `other`'s, as `field: checkpoint X, now Y` (for a refused
    /// resume).
    pub fn diff(&self, now: &TrainerState) -> String {
        let (Ok(a), Ok(b)) = (serde_json::to_value(self), serde_json::to_value(now)) else {
            return "unreadable state".into();
        };
        let (Some(oa), Some(ob)) = (a.as_object(), b.as_object()) else { return String::new() };
        oa.iter()
            .filter(|(k, x)| ob.get(*k) != Some(x))
            .map(|(k, x)| format!("{k}: checkpoint {x}, now {}", ob.get(k).map(|v| v.to_string()).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
