//! `vitgpt2-host` commands; the binary only parses arguments and calls into here.

use std::path::PathBuf;

use clap::Args;

use super::{default_device, HostCaptioner, VisionEncoderDecoder};
use crate::cli::{caption_images, GenerationArgs};
use crate::error::Result;

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

/// `vitgpt2-host caption`: as `vitgpt2-node caption`, with the candle model.
pub fn caption(args: &HostCaptionArgs) -> Result<i32> {
    let captioner = HostCaptioner::load(&args.checkpoint, &default_device())?;
    caption_images(&captioner, &args.images, args.json, &args.generation)
}

/// `vitgpt2-host init`: the original recipe's starting point, saved as a checkpoint that
/// transformers and `vitgpt2-host caption` load. Prints which tensors were loaded and which
/// were initialised.
pub fn init(args: &InitArgs) -> Result<i32> {
    let (model, report) = VisionEncoderDecoder::from_pretrained_parts(&args.vit, &args.gpt2, args.seed, &default_device())?;
    eprint!("{report}");
    model.save(&args.out)?;
    let assets = model.write_assets(&args.out, &args.vit, &args.gpt2)?;
    eprintln!(
        "saved {} (config.json, model.safetensors{}{})",
        args.out.display(),
        if assets.is_empty() { "" } else { ", " },
        assets.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect::<Vec<_>>().join(", ")
    );
    Ok(0)
}
