//! Evaluation: captions of a held-out set through a [`Captioner`] (the product's one pipeline,
//! whatever the engine) and their scores; and the validation loss of a model being trained.
//! `vitgpt2-host evaluate`, training's evaluations and `train-and-export` all use it.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::data::{decode_batch, Sample};
use super::metrics::{score, Scores};
use super::progress::Progress;
use crate::assets::SpecialTokens;
use crate::captioner::Captioner;
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::model::VisionEncoderDecoder;
use crate::preprocess::PreprocessConfig;

/// Images with their reference captions, in file order.
pub type References = [(PathBuf, Vec<String>)];

/// One captioner's results on a held-out set.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub name: String,
    pub scores: Scores,
    /// Mean ms per caption (encoder + decoder).
    pub mean_ms: f64,
    /// Images that could not be read (reported, skipped and counted).
    pub failed: usize,
    /// Per captioned image: path, caption, references, generated ids.
    #[serde(skip)]
    pub captions: Vec<(PathBuf, String, Vec<String>, Vec<u32>)>,
}

impl Evaluation {
    /// Generated ids per image, `None` for an image that failed (for token parity between runs).
    pub fn tokens_of(&self, path: &std::path::Path) -> Option<&[u32]> {
        self.captions.iter().find(|c| c.0 == path).map(|c| c.3.as_slice())
    }
}

/// Captions every image of `refs` with `gen` and scores the captions against the references.
/// A bad image is reported, skipped and counted (`failed`); `name` labels the progress.
pub fn caption_set(name: &str, captioner: &Captioner, refs: &References, gen: &GenerationConfig, quiet: bool) -> Result<Evaluation> {
    let mut progress = Progress::new(name, refs.len() as u64, quiet);
    let mut captions = Vec::with_capacity(refs.len());
    let mut total_ms = 0.0;
    let mut done = 0u64;
    let tally = captioner.caption_files(refs.iter().map(|(p, _)| p.as_path()), gen, |path, outcome| {
        done += 1;
        if let Ok(c) = outcome {
            total_ms += c.ms.encoder + c.ms.decoder;
            let references = refs.iter().find(|(p, _)| p == path).map(|(_, r)| r.clone()).unwrap_or_default();
            captions.push((path.to_path_buf(), c.caption.clone(), references, c.tokens.clone()));
        }
        progress.update(done, String::new());
        std::ops::ControlFlow::Continue(())
    })?;
    progress.finish(String::new());
    let hyps: Vec<String> = captions.iter().map(|c| c.1.clone()).collect();
    let kept: Vec<Vec<String>> = captions.iter().map(|c| c.2.clone()).collect();
    Ok(Evaluation {
        name: name.into(),
        scores: score(&hyps, &kept),
        mean_ms: total_ms / tally.captioned.max(1) as f64,
        failed: tally.failed,
        captions,
    })
}

/// Mean token cross-entropy of `model` on the first `n` samples, in file order, by micro-batches
/// of `micro_batch` (images that fail to decode are skipped). NaN when nothing decoded.
#[allow(clippy::too_many_arguments)]
pub fn validation_loss(
    model: &VisionEncoderDecoder,
    special: &SpecialTokens,
    pre: &PreprocessConfig,
    samples: &[Sample],
    tokens: &[Vec<u32>],
    n: usize,
    micro_batch: usize,
    max_tokens: usize,
    workers: usize,
) -> Result<f64> {
    let mut total = 0.0;
    let mut count = 0usize;
    let idx: Vec<usize> = (0..n.min(samples.len())).collect();
    for chunk in idx.chunks(micro_batch.max(1)) {
        let batch = decode_batch(samples, chunk, pre, workers);
        if batch.rows.is_empty() {
            continue;
        }
        let labels = make_labels(tokens, &batch.rows, special.eos(), max_tokens);
        let px = Tensor::from_vec(batch.pixels, (batch.rows.len(), 3, pre.size.height, pre.size.width), model.device())
            .map_err(|e| Error::runtime("eval", e))?;
        let (loss, _) = model.loss(&px, &labels, special, false, false).map_err(|e| Error::runtime("eval", e))?;
        total += loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(|e| Error::runtime("eval", e))? * batch.rows.len() as f64;
        count += batch.rows.len();
    }
    Ok(if count > 0 { total / count as f64 } else { f64::NAN })
}

/// Labels for `rows`: caption tokens (cut to `max - 1`) then `eos`, padded with -100.
pub fn make_labels(tokens: &[Vec<u32>], rows: &[usize], eos: u32, max: usize) -> Vec<Vec<i64>> {
    let mut out: Vec<Vec<i64>> = rows
        .iter()
        .map(|&i| {
            let mut l: Vec<i64> = tokens[i].iter().take(max.saturating_sub(1)).map(|&x| x as i64).collect();
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
