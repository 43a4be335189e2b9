//! `vitgpt2-host synth | train | evaluate | train-tokenizer`; the binary only parses arguments
//! and calls into here with these option structs.

use std::path::PathBuf;
use std::time::Instant;

use super::data::load_captions;
use super::eval::caption_set;
use super::options::TrainOptions;
use super::setup::select_device;
use crate::error::{write_atomic, Error, Result};
use crate::generate::GenerationOverrides;
use crate::model::open_checkpoint;

/// `vitgpt2-host synth`.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Output folder: images/ and captions.json (COCO format).
    pub out: PathBuf,
    /// Number of images.
    pub count: usize,
    pub seed: u64,
    /// Image side in pixels.
    pub size: u32,
}

/// `vitgpt2-host train-tokenizer`.
#[derive(Debug, Clone)]
pub struct TokenizerOptions {
    /// Captions to train on (COCO or flat records).
    pub captions: PathBuf,
    pub images: Option<PathBuf>,
    pub caption_field: String,
    pub vocab_size: usize,
    /// Output folder for tokenizer.json and tokenizer_config.json.
    pub out: PathBuf,
}

/// `vitgpt2-host evaluate`.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    /// Checkpoint folder (as `vitgpt2-host caption` takes).
    pub checkpoint: PathBuf,
    /// Captions of the held-out set (COCO or flat records).
    pub data: PathBuf,
    pub images: Option<PathBuf>,
    pub caption_field: String,
    /// Evaluate the first N images only.
    pub limit: Option<usize>,
    /// Generation settings over the checkpoint's generation_config.json (e.g. the beam width).
    pub generation: GenerationOverrides,
    pub device: String,
    /// Also write every (image, hypothesis, references) as JSON lines here.
    pub predictions: Option<PathBuf>,
}

pub fn synth(opts: &SynthOptions) -> Result<i32> {
    if opts.count == 0 {
        return Err(Error::setting("--count", "must be at least 1"));
    }
    let (images, captions) = super::synth::write_set(&opts.out, opts.count, opts.seed, opts.size)?;
    eprintln!("wrote {images} images and {captions} captions to {}", opts.out.display());
    Ok(0)
}

pub fn train_tokenizer(opts: &TokenizerOptions) -> Result<i32> {
    let set = load_captions(&opts.captions, opts.images.as_deref(), &opts.caption_field)?;
    let caps: Vec<String> = set.samples.iter().map(|s| s.caption.clone()).collect();
    super::tokenizer::train_bpe(&caps, opts.vocab_size, &opts.out)?;
    eprintln!("trained a byte-level BPE of {} ids on {} captions into {}", opts.vocab_size, caps.len(), opts.out.join("tokenizer.json").display());
    Ok(0)
}

pub fn train(opts: &TrainOptions) -> Result<i32> {
    let s = super::trainer::train(opts)?;
    if let (Some(a), Some(b)) = (s.first_loss, s.last_loss) {
        eprintln!("steps {}: loss {a:.4} -> {b:.4}", s.steps);
    }
    Ok(0)
}

/// `vitgpt2-host evaluate`: captions the held-out images with the checkpoint (the product's
/// pipeline) and prints exact match, BLEU-1..4, ROUGE-L and CIDEr-D as JSON. Exit code 1 when an
/// image could not be read (reported, skipped, counted in `failed`).
pub fn evaluate(opts: &EvaluateOptions) -> Result<i32> {
    let device = select_device(&opts.device)?;
    let captioner = open_checkpoint(&opts.checkpoint, &device)?;
    let gen = opts.generation.apply(captioner.generation_config())?;
    let set = load_captions(&opts.data, opts.images.as_deref(), &opts.caption_field)?;
    if let Some(r) = set.skip_report("evaluation captions") {
        eprintln!("{r}");
    }
    let mut refs = set.references();
    if let Some(n) = opts.limit {
        refs.truncate(n);
    }
    let t0 = Instant::now();
    let ev = caption_set("evaluate", &captioner, &refs, &gen, false)?;
    if let Some(p) = &opts.predictions {
        let mut text = String::new();
        for (image, caption, references, _) in &ev.captions {
            let line = serde_json::json!({"image": image, "caption": caption, "references": references});
            text.push_str(&format!("{line}\n"));
        }
        write_atomic(p, text.as_bytes())?;
    }
    let s = &ev.scores;
    let out = serde_json::json!({
        "images": s.n, "exact": s.exact, "bleu1": s.bleu[0], "bleu2": s.bleu[1], "bleu3": s.bleu[2], "bleu4": s.bleu[3],
        "rouge_l": s.rouge_l, "cider_d": s.cider_d, "num_beams": gen.num_beams, "failed": ev.failed, "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{out}");
    Ok(i32::from(ev.failed > 0))
}
