//! `vitgpt2-host synth | train | evaluate | train-tokenizer`; the binary only parses
//! arguments and calls into here.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::data::load_captions;
use super::metrics::score;
use super::trainer::{select_device, TrainArgs};
use crate::caption::GenerationOverrides;
use crate::error::{Error, Result};
use crate::model::HostCaptioner;
use crate::preprocess::load_image;

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

pub fn synth(args: &SynthArgs) -> Result<i32> {
    if args.count == 0 {
        return Err(Error::setting("--count", "must be at least 1"));
    }
    let (images, captions) = super::synth::write_set(&args.out, args.count, args.seed, args.size)?;
    eprintln!("wrote {images} images and {captions} captions to {}", args.out.display());
    Ok(0)
}

pub fn train_tokenizer(args: &TokenizerArgs) -> Result<i32> {
    let set = load_captions(&args.captions, args.images.as_deref(), &args.caption_field)?;
    let caps: Vec<String> = set.samples.iter().map(|s| s.caption.clone()).collect();
    super::tokenizer::train_bpe(&caps, args.vocab_size, &args.out)?;
    eprintln!("trained a byte-level BPE of {} ids on {} captions into {}", args.vocab_size, caps.len(), args.out.join("tokenizer.json").display());
    Ok(0)
}

pub fn train(args: &TrainArgs) -> Result<i32> {
    let s = super::trainer::train(args)?;
    if let (Some(a), Some(b)) = (s.first_loss, s.last_loss) {
        eprintln!("steps {}: loss {a:.4} -> {b:.4}", s.steps);
    }
    Ok(0)
}

/// `vitgpt2-host evaluate`: captions the held-out images with the checkpoint (the product's
/// pipeline: `HostCaptioner`) and prints exact match, BLEU-1..4, ROUGE-L and CIDEr-D as JSON.
pub fn evaluate(args: &EvaluateArgs) -> Result<i32> {
    let device = select_device(&args.device)?;
    let captioner = HostCaptioner::load(&args.checkpoint, &device)?;
    let gen = GenerationOverrides { num_beams: args.num_beams, ..Default::default() }.apply(crate::cli::CaptionFiles::generation_config(&captioner))?;
    let set = load_captions(&args.data, args.images.as_deref(), &args.caption_field)?;
    if let Some(r) = set.skip_report("evaluation captions") {
        eprintln!("{r}");
    }
    let mut refs = set.references();
    if let Some(n) = args.limit {
        refs.truncate(n);
    }
    let t0 = Instant::now();
    let mut hyps = Vec::new();
    let mut kept = Vec::new();
    let mut lines = Vec::new();
    for (path, r) in &refs {
        let img = match load_image(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("warning: skipping {e}");
                continue;
            }
        };
        let c = captioner.caption_image(&img, &gen)?;
        lines.push(serde_json::json!({"image": path, "caption": c.caption, "references": r}));
        hyps.push(c.caption);
        kept.push(r.clone());
    }
    let s = score(&hyps, &kept);
    if let Some(p) = &args.predictions {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(p, text).map_err(|e| Error::setting("--predictions", format!("cannot write {}: {e}", p.display())))?;
    }
    let out = serde_json::json!({
        "images": s.n, "exact": s.exact, "bleu1": s.bleu[0], "bleu2": s.bleu[1], "bleu3": s.bleu[2], "bleu4": s.bleu[3],
        "rouge_l": s.rouge_l, "cider_d": s.cider_d, "num_beams": gen.num_beams, "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{out}");
    Ok(0)
}
