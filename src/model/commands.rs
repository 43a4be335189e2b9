//! `vitgpt2-host caption | init | convert`; the binary only parses arguments and calls into here.

use std::path::PathBuf;

use candle_core::Device;

use super::{default_device, open_checkpoint, VisionEncoderDecoder};
use crate::commands::print_captions;
use crate::error::{Error, Result};
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

/// `vitgpt2-host convert`.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Any checkpoint folder `caption` reads (the original ViT-GPT2's Flax folder included).
    pub checkpoint: PathBuf,
    /// Output folder: a transformers `VisionEncoderDecoderModel` checkpoint.
    pub out: PathBuf,
}

/// What transformers does with a converted original ViT-GPT2, said by `convert`.
pub const CAUSAL_CROSS_WARNING: &str = "warning: config.json sets decoder.cross_attention_causal (the original ViT-GPT2's cross-attention: caption position t sees image tokens 0..t only), a vitgpt2 setting that transformers ignores: VisionEncoderDecoderModel.from_pretrained runs the ordinary cross-attention over every image token and gives other logits and captions (on the test fixture, logits moved by 13 to 24). vitgpt2-host and bundles from vitgpt2-host export honour it; in transformers, pass the decoder encoder_attention_mask = ones(T, S).tril() per image with attn_implementation=\"eager\" (scripts/check_transformers_load.py does)";

/// `vitgpt2-host convert`: reads a checkpoint folder of any kind vitgpt2 reads and writes a
/// transformers `VisionEncoderDecoderModel` checkpoint: config.json, model.safetensors (the ViT
/// pooler included, so transformers reports no missing keys), generation_config.json,
/// preprocessor_config.json, tokenizer.json + vocab.json/merges.txt, tokenizer_config.json,
/// special_tokens_map.json. Prints what was loaded, dropped and defaulted. Errors: the
/// checkpoint's (one line naming the file and tensor); `--out` being the checkpoint folder.
pub fn convert(opts: &ConvertOptions) -> Result<i32> {
    let same = |a: &std::path::Path, b: &std::path::Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same(&opts.checkpoint, &opts.out) {
        return Err(Error::setting("--out", "is the checkpoint folder itself (its config.json would be overwritten): choose another folder"));
    }
    let format = super::format::detect(&opts.checkpoint)?;
    let (model, report) = VisionEncoderDecoder::from_checkpoint(&opts.checkpoint, &Device::Cpu)?;
    eprintln!("{}: {}", opts.checkpoint.display(), format.describe());
    eprint!("{report}");
    model.save(&opts.out)?;
    let mut files = vec!["model.safetensors".to_string()];
    files.extend(crate::export::write_configs(&model, &opts.checkpoint, &opts.out)?);
    eprintln!("saved {}: {}", opts.out.display(), files.join(", "));
    if model.config.decoder.cross_attention_causal {
        eprintln!("{CAUSAL_CROSS_WARNING}");
    }
    Ok(0)
}
