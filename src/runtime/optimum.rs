//! Optimum's `image-to-text-with-past` layouts: the decoder graphs take the encoder output and
//! recompute the cross-attention keys/values at every step; the self-attention cache is fed back
//! as `past_key_values.{i}.key/value`. The decoder is either two graphs (`decoder_model` for the
//! first step, `decoder_with_past_model` after) or Optimum's merged one: its `If` is replaced at
//! load by the cache branch (see [`OnnxFile::specialize_use_cache`]) and, like a merged decoder
//! written without an `If` (this project's export), it is one plan for every step, given an empty
//! past first.

use std::path::PathBuf;
use std::sync::Arc;

use ndarray::{Array2, Array4, Axis, Ix3};
use tract_onnx::prelude::*;

use super::graph::{declared_inputs, Graph, InputSpec};
use super::onnx_file::OnnxFile;
use super::{gather_rows, ids_tensor, is_identity};
use crate::assets::ModelAssets;
use crate::bundle::contract::tensor;
use crate::bundle::{Dtype, GraphLayout};
use crate::engine::{Engine, ImageEncoding};
use crate::error::{chain, Error, Result};
use crate::generate::DecoderSession;

/// The decoder files of an Optimum bundle (made once per load: their size does not matter).
#[allow(clippy::large_enum_variant)]
pub enum DecoderFiles {
    /// `decoder_model` + `decoder_with_past_model`.
    Split { decoder: OnnxFile, decoder_with_past: OnnxFile },
    /// `decoder_model_merged`.
    Merged(OnnxFile),
}

pub struct OptimumRuntime {
    layout: GraphLayout,
    dtype: Dtype,
    files: Vec<PathBuf>,
    encoder: Graph,
    /// The first step's plan and the later steps' (the same plan for a merged decoder without an `If`).
    decoder: Arc<Graph>,
    decoder_with_past: Arc<Graph>,
    heads: usize,
    head_dim: usize,
    /// `past_key_values.{i}.key/value` and `present.{i}.key/value`, layer by layer.
    past_names: Vec<String>,
    present_names: Vec<String>,
}

impl OptimumRuntime {
    /// Loads the encoder and the decoder plans (weights of `dtype`) and checks them against
    /// `assets.config` (input and output names, declared shapes, vocabulary). Errors:
    /// [`Error::Bundle`] naming the graph file.
    pub fn load(assets: &ModelAssets, encoder: OnnxFile, decoder: DecoderFiles, dtype: Dtype) -> Result<Self> {
        let cfg = &assets.config;
        let (h, w) = (assets.preprocess.size.height, assets.preprocess.size.width);
        let enc_seq = cfg.encoder.seq_len();
        let enc_dim = cfg.encoder.hidden_size;
        let (n_layer, heads, head_dim) = (cfg.decoder.n_layer, cfg.decoder.n_head, cfg.decoder.head_dim());
        let encoder_path = encoder.path.clone();
        let encoder_graph = Graph::load(
            encoder,
            |_| vec![InputSpec::new(tensor::PIXEL_VALUES, f32::datum_type(), [1, 3, h, w].map(TDim::from).to_vec())],
            &[tensor::LAST_HIDDEN_STATE.to_string()],
        )?;
        let past_names = tensor::per_layer(n_layer, tensor::past_key_values);
        let present_names = tensor::per_layer(n_layer, tensor::present);
        let mut dec_outputs = vec![tensor::LOGITS.to_string()];
        dec_outputs.extend(present_names.iter().cloned());
        // The inputs a decoder graph must take; the past and `use_cache_branch` only where it
        // declares them (a first-step graph has no past).
        let specs = |m: &InferenceModel| {
            let declared = declared_inputs(m);
            let b = TDim::from(m.sym("B"));
            let mut v = vec![
                InputSpec::new(tensor::INPUT_IDS, i64::datum_type(), vec![b.clone(), 1.into()]),
                InputSpec::new(tensor::ENCODER_HIDDEN_STATES, f32::datum_type(), vec![b.clone(), enc_seq.into(), enc_dim.into()]),
            ];
            if declared.iter().any(|n| n.starts_with("past_key_values.")) {
                let p = TDim::from(m.sym("P"));
                for name in &past_names {
                    v.push(InputSpec::new(name, f32::datum_type(), vec![b.clone(), heads.into(), p.clone(), head_dim.into()]));
                }
            }
            if declared.iter().any(|n| n == tensor::USE_CACHE_BRANCH) {
                v.push(InputSpec::new(tensor::USE_CACHE_BRANCH, bool::datum_type(), vec![1.into()]));
            }
            v
        };
        let layout = match &decoder {
            DecoderFiles::Split { .. } => GraphLayout::Optimum,
            DecoderFiles::Merged(_) => GraphLayout::OptimumMerged,
        };
        let (first, later, files) = match decoder {
            DecoderFiles::Split { decoder, decoder_with_past } => {
                let paths = vec![decoder.path.clone(), decoder_with_past.path.clone()];
                let first = Graph::load(decoder, specs, &dec_outputs)?;
                let later = Graph::load(decoder_with_past, specs, &dec_outputs)?;
                (Arc::new(first), Arc::new(later), paths)
            }
            DecoderFiles::Merged(mut file) => {
                file.specialize_use_cache()?;
                let paths = vec![file.path.clone()];
                let one = Arc::new(Graph::load(file, specs, &dec_outputs)?);
                (Arc::clone(&one), one, paths)
            }
        };
        if !later.has_input(&past_names[0]) {
            return Err(Error::bundle(later.path(), "the decoder for later steps takes no past_key_values: is this a decoder_with_past_model?"));
        }
        first.check_last_dim(tensor::LOGITS, cfg.decoder.vocab_size, "entries but config.json says vocab_size =")?;
        let mut all = vec![encoder_path];
        all.extend(files);
        Ok(OptimumRuntime { layout, dtype, files: all, encoder: encoder_graph, decoder: first, decoder_with_past: later, heads, head_dim, past_names, present_names })
    }
}

impl Engine for OptimumRuntime {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let out = self.encoder.run("encoder", vec![(tensor::PIXEL_VALUES, pixel_values.into_tensor().into_tvalue())])?;
        let hidden = out[self.encoder.output_index(tensor::LAST_HIDDEN_STATE)?].clone();
        Ok(Box::new(OptimumEncoding { rt: self, hidden }))
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        let name = if self.layout == GraphLayout::Optimum { "optimum" } else { "optimum merged" };
        format!("{name} layout ({}): {}", self.dtype.word(), files.join(", "))
    }

    fn dtype(&self) -> &str {
        self.dtype.word()
    }

    fn weight_files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
}

struct OptimumEncoding<'a> {
    rt: &'a OptimumRuntime,
    /// `[1, seq, dim]`
    hidden: TValue,
}

impl ImageEncoding for OptimumEncoding<'_> {
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>> {
        let hidden = if rows == 1 { self.hidden.clone() } else { gather_rows("decoder", &self.hidden, &vec![0; rows])? };
        Ok(Box::new(OptimumSession { rt: self.rt, hidden, past: None }))
    }
}

struct OptimumSession<'a> {
    rt: &'a OptimumRuntime,
    hidden: TValue,
    /// `past_key_values.{i}.key/value`, layer by layer, key before value.
    past: Option<Vec<TValue>>,
}

impl DecoderSession for OptimumSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
        let rt = self.rt;
        let ids = ids_tensor(i64::datum_type(), tokens)?;
        let mut inputs: Vec<(&str, TValue)> = vec![(tensor::INPUT_IDS, ids), (tensor::ENCODER_HIDDEN_STATES, self.hidden.clone())];
        let use_cache = self.past.is_some();
        let graph = if use_cache { &rt.decoder_with_past } else { &rt.decoder };
        if graph.has_input(&rt.past_names[0]) {
            let past = match self.past.take() {
                Some(p) => p,
                // A merged decoder's first step: an empty past, as Optimum and transformers.js feed it.
                None => {
                    let empty = Tensor::zero::<f32>(&[tokens.len(), rt.heads, 0, rt.head_dim]).map_err(|e| Error::runtime("decoder", chain(&e)))?;
                    vec![empty.into_tvalue(); rt.past_names.len()]
                }
            };
            inputs.extend(rt.past_names.iter().map(String::as_str).zip(past));
        }
        if graph.has_input(tensor::USE_CACHE_BRANCH) {
            inputs.push((tensor::USE_CACHE_BRANCH, tensor1(&[use_cache]).into_tvalue()));
        }
        let out = graph.run("decoder", inputs)?;
        let logits = logits_last("decoder", &out[graph.output_index(tensor::LOGITS)?])?;
        let past = rt.present_names.iter().map(|n| Ok(out[graph.output_index(n)?].clone())).collect::<Result<Vec<_>>>()?;
        self.past = Some(past);
        Ok(logits)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(past) = &self.past {
            if !is_identity(rows, past.first().map_or(0, |t| t.shape()[0])) {
                self.past = Some(past.iter().map(|t| gather_rows("decoder", t, rows)).collect::<Result<Vec<_>>>()?);
            }
        }
        Ok(())
    }
}

/// The last position's logits `[B, V]` of `[B, T, V]`.
fn logits_last(stage: &str, t: &TValue) -> Result<Array2<f32>> {
    let view = t.to_plain_array_view::<f32>().map_err(|e| Error::runtime(stage, chain(&e)))?;
    let view = view.into_dimensionality::<Ix3>().map_err(|e| Error::runtime(stage, format!("logits: {e}")))?;
    let last = view.shape()[1] - 1;
    Ok(view.index_axis(Axis(1), last).to_owned())
}
