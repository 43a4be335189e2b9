//! `vitgpt2-host`'s command line (clap); each command converts to the library's option struct.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vitgpt2::export::pipeline::{PipelineSource, TrainAndExportOptions};
use vitgpt2::export::{ExportCommand, ExportPreset, Layout, ModelSource};
use vitgpt2::model::commands::{ConvertOptions, HostCaptionOptions, InitOptions};
use vitgpt2::train::commands::{EvaluateOptions, SynthOptions, TokenizerOptions};
use vitgpt2::train::options::{ComputeDtype, Decay, PositionInit, Preset, TrainOptions};
use vitgpt2::error::{Error, Result};
use vitgpt2::GenerationOverrides;

use crate::generation::GenerationArgs;

#[derive(Parser)]
#[command(name = "vitgpt2-host", version, about = "French image captions on the host (ViT-GPT2 in candle)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Caption image files with a checkpoint folder, one line per image (as vitgpt2-node caption).
    Caption(HostCaptionArgs),
    /// Build a ViT-GPT2 from a pretrained ViT and a pretrained GPT-2 and save it as a checkpoint.
    Init(InitArgs),
    /// Write any checkpoint vitgpt2 reads (e.g. the original ViT-GPT2's Flax folder) as a
    /// transformers VisionEncoderDecoderModel checkpoint (safetensors, configs, tokenizer).
    Convert(ConvertArgs),
    /// Draw a synthetic French captioning set (shapes; COCO format), deterministic by seed.
    Synth(SynthArgs),
    /// Train a byte-level BPE tokenizer on captions.
    TrainTokenizer(TokenizerArgs),
    /// Fine-tune (or train from scratch) on COCO-format or flat caption records.
    Train(Box<TrainArgs>),
    /// Caption a held-out set and print exact match, BLEU-1..4, ROUGE-L and CIDEr-D.
    Evaluate(EvaluateArgs),
    /// Export a checkpoint (or random weights) to an ONNX bundle for vitgpt2-node (fp32, int8).
    Export(ExportArgs),
    /// Train (or --from-checkpoint), export fp32 and int8, evaluate both, write the bundle with its manifest.
    TrainAndExport(TrainAndExportArgs),
}

#[derive(Debug, Clone, Args)]
pub struct HostCaptionArgs {
    /// Checkpoint folder: config.json, model.safetensors (or pytorch_model.bin),
    /// preprocessor_config.json, tokenizer, optionally generation_config.json.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images to caption.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// One JSON object per image and line: image, caption, tokens, score, steps, ms.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

impl From<&HostCaptionArgs> for HostCaptionOptions {
    fn from(a: &HostCaptionArgs) -> Self {
        HostCaptionOptions { checkpoint: a.checkpoint.clone(), images: a.images.clone(), json: a.json, generation: (&a.generation).into() }
    }
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Pretrained ViT folder (e.g. google/vit-base-patch16-224-in21k): config.json, weights,
    /// preprocessor_config.json.
    #[arg(long)]
    pub vit: PathBuf,
    /// Pretrained GPT-2 folder (e.g. asi/gpt-fr-cased-small): config.json, weights, tokenizer.
    #[arg(long)]
    pub gpt2: PathBuf,
    /// Output checkpoint folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the new cross-attention weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl From<&InitArgs> for InitOptions {
    fn from(a: &InitArgs) -> Self {
        InitOptions { vit: a.vit.clone(), gpt2: a.gpt2.clone(), out: a.out.clone(), seed: a.seed }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Checkpoint folder: transformers' (PyTorch or Flax weights) or the original ViT-GPT2's
    /// (config.json + flax_model.msgpack, with vocab.json + merges.txt).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder (created): a transformers VisionEncoderDecoderModel checkpoint.
    #[arg(long)]
    pub out: PathBuf,
}

impl From<&ConvertArgs> for ConvertOptions {
    fn from(a: &ConvertArgs) -> Self {
        ConvertOptions { checkpoint: a.checkpoint.clone(), out: a.out.clone() }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Output folder: images/ and captions.json (COCO format).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long)]
    pub count: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 128)]
    pub size: u32,
}

impl From<&SynthArgs> for SynthOptions {
    fn from(a: &SynthArgs) -> Self {
        SynthOptions { out: a.out.clone(), count: a.count, seed: a.seed, size: a.size }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TokenizerArgs {
    /// Captions to train on (COCO or flat records).
    #[arg(long)]
    pub captions: PathBuf,
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long, default_value = "caption")]
    pub caption_field: String,
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Output folder for tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    pub out: PathBuf,
}

impl From<&TokenizerArgs> for TokenizerOptions {
    fn from(a: &TokenizerArgs) -> Self {
        TokenizerOptions {
            captions: a.captions.clone(),
            images: a.images.clone(),
            caption_field: a.caption_field.clone(),
            vocab_size: a.vocab_size,
            out: a.out.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct EvaluateArgs {
    /// Checkpoint folder (as `vitgpt2-host caption` takes).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Captions of the held-out set (COCO or flat records).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long, default_value = "caption")]
    pub caption_field: String,
    /// Evaluate the first N images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Beam width (default: the checkpoint's generation_config.json).
    #[arg(long)]
    pub num_beams: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write every (image, hypothesis, references) as JSON lines here.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
}

impl From<&EvaluateArgs> for EvaluateOptions {
    fn from(a: &EvaluateArgs) -> Self {
        EvaluateOptions {
            checkpoint: a.checkpoint.clone(),
            data: a.data.clone(),
            images: a.images.clone(),
            caption_field: a.caption_field.clone(),
            limit: a.limit,
            generation: GenerationOverrides { num_beams: a.num_beams, ..Default::default() },
            device: a.device.clone(),
            predictions: a.predictions.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder (config.json + model.safetensors, tokenizer, preprocessor_config.json).
    #[arg(long, conflicts_with = "random_init", required_unless_present = "random_init")]
    pub checkpoint: Option<PathBuf>,
    /// Random weights of a preset size instead of a checkpoint (benchmarks).
    #[arg(long, requires = "preset")]
    pub random_init: bool,
    /// vit-base-gpt2-small (ViT-B/16 at 224 + GPT-2 small, 50,000 tokens) or tiny (tests).
    #[arg(long)]
    pub preset: Option<ExportPreset>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the tokenizer, generation and preprocessor configs come from (default: the
    /// checkpoint folder; required with --random-init).
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Output bundle folder.
    #[arg(long)]
    pub out: PathBuf,
    /// fast, optimum or both.
    #[arg(long, default_value = "fast")]
    pub layout: Layout,
    /// Also write int8 graphs.
    #[arg(long)]
    pub int8: bool,
    /// Write only the int8 graphs.
    #[arg(long, requires = "int8")]
    pub int8_only: bool,
    /// int8 weights in 7 bits (±64), as onnxruntime's `reduce_range`: exact and faster products
    /// on x86-64 CPUs with AVX2 but no VNNI, one bit less weight precision (README "Performance").
    #[arg(long, requires = "int8")]
    pub reduce_range: bool,
}

impl From<&ExportArgs> for ExportCommand {
    fn from(a: &ExportArgs) -> Self {
        let source = match (&a.checkpoint, a.preset) {
            (Some(dir), _) => ModelSource::Checkpoint(dir.clone()),
            // clap guarantees --checkpoint or --random-init --preset.
            (None, preset) => ModelSource::RandomInit { preset: preset.unwrap_or(ExportPreset::Tiny), seed: a.seed },
        };
        ExportCommand { source, assets: a.assets.clone(), out: a.out.clone(), layout: a.layout, int8: a.int8, int8_only: a.int8_only, reduce_range: a.reduce_range }
    }
}

#[derive(Args, Debug)]
pub struct TrainAndExportArgs {
    /// Skip training: export this checkpoint folder.
    #[arg(long, required_unless_present = "train_args")]
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
    /// int8 weights in 7 bits (as `export --reduce-range`); the evaluation reports how often
    /// int8 still gives fp32's tokens.
    #[arg(long)]
    pub reduce_range: bool,
}

/// `train`'s flags on their own, to parse `--train-args`.
#[derive(Parser)]
struct TrainCli {
    #[command(flatten)]
    args: TrainArgs,
}

impl TrainAndExportArgs {
    /// `--train-args` parsed as `vitgpt2-host train`'s flags. Errors: [`Error::Setting`] with
    /// clap's message, one line.
    pub fn train_args(&self) -> Option<Result<TrainArgs>> {
        self.train_args.as_deref().map(|s| {
            let argv = std::iter::once("train").chain(s.split_whitespace());
            TrainCli::try_parse_from(argv).map(|c| c.args).map_err(|e| Error::setting("--train-args", e))
        })
    }

    /// The pipeline's options. Errors: `--train-args` that do not parse, or neither it nor
    /// `--from-checkpoint` given.
    pub fn options(&self) -> Result<TrainAndExportOptions> {
        let source = match (&self.from_checkpoint, self.train_args()) {
            (Some(dir), _) => PipelineSource::Checkpoint { dir: dir.clone(), note: self.training_note.clone() },
            (None, Some(parsed)) => PipelineSource::Train {
                options: Box::new((&parsed?).into()),
                command_line: self.train_args.clone().unwrap_or_default(),
            },
            (None, None) => return Err(Error::Invalid("train-and-export: pass --from-checkpoint DIR or --train-args \"…\"".into())),
        };
        Ok(TrainAndExportOptions {
            source,
            eval: self.eval.clone(),
            eval_images: self.eval_images.clone(),
            eval_limit: self.eval_limit,
            out: self.out.clone(),
            int8_only: self.int8_only,
            reduce_range: self.reduce_range,
        })
    }
}

/// The library's defaults, which the flags below show and use.
fn defaults() -> TrainOptions {
    TrainOptions::new(PathBuf::new(), PathBuf::new())
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
    #[arg(long, default_value_t = defaults().val_fraction)]
    pub val_fraction: f64,
    /// The caption field of the records (`caption`, `fr`, `en`).
    #[arg(long, default_value_t = defaults().caption_field)]
    pub caption_field: String,
    /// Decode every image once before training and drop those that fail.
    #[arg(long)]
    pub verify_images: bool,

    /// Start from this checkpoint folder (e.g. made by `vitgpt2-host init --vit --gpt2`).
    #[arg(long, conflicts_with = "init_preset")]
    pub checkpoint: Option<PathBuf>,
    /// Start from a randomly initialised small model instead.
    /// (tiny or small)
    #[arg(long)]
    pub init_preset: Option<Preset>,
    /// With a preset: the encoder's input side in pixels instead of the preset's.
    #[arg(long, requires = "init_preset")]
    pub image_size: Option<usize>,
    /// With a preset: the ViT patch side instead of the preset's.
    #[arg(long, requires = "init_preset")]
    pub patch_size: Option<usize>,
    /// How a preset starts the ViT's learned position embeddings: a 2-D sine-cosine table
    /// (default; lets a small encoder learn where things are), or N(0, 0.02) as `transformers`.
    #[arg(long, default_value_t = defaults().position_init)]
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
    #[arg(long, default_value_t = defaults().device)]
    pub device: String,
    /// Compute precision: `f32`, or `bf16` mixed precision (matrix products in bf16; layer norm,
    /// softmax, the loss and the master weights in f32). Meant for CUDA; slow on most CPUs.
    #[arg(long, default_value_t = defaults().dtype)]
    pub dtype: ComputeDtype,
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,

    /// Effective batch size (micro-batch × accumulation).
    #[arg(long, default_value_t = defaults().batch_size)]
    pub batch_size: usize,
    /// Micro-batch size; gradients are accumulated over batch_size / micro_batch of them.
    #[arg(long, default_value_t = defaults().micro_batch)]
    pub micro_batch: usize,
    /// Optimizer steps (default: --epochs over the training pairs).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = defaults().epochs)]
    pub epochs: f64,
    #[arg(long, default_value_t = defaults().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = defaults().min_lr)]
    pub min_lr: f64,
    /// linear or cosine.
    #[arg(long, default_value_t = defaults().decay)]
    pub decay: Decay,
    #[arg(long, default_value_t = defaults().warmup_steps)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = defaults().beta1)]
    pub beta1: f64,
    #[arg(long, default_value_t = defaults().beta2)]
    pub beta2: f64,
    #[arg(long, default_value_t = defaults().adam_eps)]
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm (0: off).
    #[arg(long, default_value_t = defaults().clip)]
    pub clip: f64,
    /// Train only the decoder (and enc_to_dec_proj).
    #[arg(long)]
    pub freeze_encoder: bool,
    /// Longest label (caption tokens + </s>); longer captions are cut.
    #[arg(long, default_value_t = defaults().max_tokens)]
    pub max_tokens: usize,

    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = defaults().eval_every)]
    pub eval_every: u64,
    /// Validation images captioned (greedy) at each evaluation.
    #[arg(long, default_value_t = defaults().eval_images)]
    pub eval_images: usize,
    /// Validation micro-batches for the validation loss.
    #[arg(long, default_value_t = defaults().eval_batches)]
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = defaults().save_every)]
    pub save_every: u64,
    /// Log the training loss every N steps.
    #[arg(long, default_value_t = defaults().log_every)]
    pub log_every: u64,
    /// Stop after this many steps of the run (as if killed after a checkpoint; for tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Image decoding threads.
    #[arg(long, default_value_t = defaults().workers)]
    pub workers: usize,
    /// Compute threads on the CPU (default: the cores left after --workers, at least 1;
    /// CANDLE_NUM_THREADS / RAYON_NUM_THREADS, when set, win over the default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Micro-batches decoded ahead of the trainer.
    #[arg(long, default_value_t = defaults().prefetch)]
    pub prefetch: usize,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}


impl From<&TrainArgs> for TrainOptions {
    fn from(a: &TrainArgs) -> Self {
        TrainOptions {
            train: a.train.clone(),
            train_images: a.train_images.clone(),
            val: a.val.clone(),
            val_images: a.val_images.clone(),
            val_fraction: a.val_fraction,
            caption_field: a.caption_field.clone(),
            verify_images: a.verify_images,
            checkpoint: a.checkpoint.clone(),
            init_preset: a.init_preset,
            image_size: a.image_size,
            patch_size: a.patch_size,
            position_init: a.position_init,
            tokenizer: a.tokenizer.clone(),
            bpe_vocab: a.bpe_vocab,
            out: a.out.clone(),
            resume: a.resume,
            device: a.device.clone(),
            dtype: a.dtype,
            seed: a.seed,
            batch_size: a.batch_size,
            micro_batch: a.micro_batch,
            steps: a.steps,
            epochs: a.epochs,
            lr: a.lr,
            min_lr: a.min_lr,
            decay: a.decay,
            warmup_steps: a.warmup_steps,
            weight_decay: a.weight_decay,
            beta1: a.beta1,
            beta2: a.beta2,
            adam_eps: a.adam_eps,
            clip: a.clip,
            freeze_encoder: a.freeze_encoder,
            max_tokens: a.max_tokens,
            eval_every: a.eval_every,
            eval_images: a.eval_images,
            eval_batches: a.eval_batches,
            save_every: a.save_every,
            log_every: a.log_every,
            stop_after: a.stop_after,
            workers: a.workers,
            threads: a.threads,
            prefetch: a.prefetch,
            quiet: a.quiet,
        }
    }
}
