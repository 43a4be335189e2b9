//! `vitgpt2-host caption | init`; the binary only parses arguments and calls into here.

use std::path::PathBuf;

use super::{default_device, open_checkpoint, VisionEncoderDecoder};
use crate::commands::print_captions;
use crate::error::Result;
use crate::generate::GenerationOverrides;

/// `vitgpt2-host caption`.
#[derive(Debug, Clone)]
pub struct HostCaptionOptions {
    /// Checkpoint folder: config.json, model.safetensors (or pytorch_model.bin),
    /// preprocessor_config.json, tokenizer, optionally generation_config.json.
    pub checkpoint: PathBuf,
    pub images: Vec<PathBuf>,
    /// One JSON object per image and line: image, caption, tokens, score, steps, ms.
    pub json: bool,
    pub generation: GenerationOverrides,
}

/// `vitgpt2-host init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Pretrained ViT folder (e.g. google/vit-base-patch16-224-in21k): config.json, weights,
    /// preprocessor_config.json.
    pub vit: PathBuf,
    /// Pretrained GPT-2 folder (e.g. asi/gpt-fr-cased-small): config.json, weights, tokenizer.
    pub gpt2: PathBuf,
    /// Output checkpoint folder.
    pub out: PathBuf,
    /// Seed of the new cross-attention weights.
    pub seed: u64,
}

/// `vitgpt2-host caption`: as `vitgpt2-node caption`, with the candle model.
pub fn caption(opts: &HostCaptionOptions) -> Result<i32> {
    let captioner = open_checkpoint(&opts.checkpoint, &default_device())?;
    print_captions(&captioner, &opts.images, opts.json, &opts.generation)
}

/// `vitgpt2-host init`: the original recipe's starting point, saved as a checkpoint that
/// transformers and `vitgpt2-host caption` load. Prints which tensors were loaded and which
/// were initialised.
pub fn init(opts: &InitOptions) -> Result<i32> {
    let (model, report) = VisionEncoderDecoder::from_pretrained_parts(&opts.vit, &opts.gpt2, opts.seed, &default_device())?;
    eprint!("{report}");
    model.save(&opts.out)?;
    let assets = model.write_assets(&opts.out, &opts.vit, &opts.gpt2)?;
    eprintln!(
        "saved {} (config.json, model.safetensors{}{})",
        opts.out.display(),
        if assets.is_empty() { "" } else { ", " },
        assets.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect::<Vec<_>>().join(", ")
    );
    Ok(0)
}
