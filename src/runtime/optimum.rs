//! Optimum's `image-to-text-with-past` layout: the decoder graphs take the encoder output and
//! recompute the cross-attention keys/values at every step; the self-attention cache is fed back
//! as `past_key_values.{i}.key/value`.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, Axis, Ix3};
use tract_onnx::prelude::*;

use super::graph::{Graph, InputSpec};
use super::{gather_rows, ids_tensor, is_identity};
use crate::assets::ModelAssets;
use crate::bundle::contract::tensor;
use crate::engine::{Engine, ImageEncoding};
use crate::error::{chain, Error, Result};
use crate::generate::DecoderSession;

pub struct OptimumRuntime {
    dtype: &'static str,
    encoder: Graph,
    decoder: Graph,
    decoder_with_past: Graph,
    ids_dtype: DatumType,
    /// `past_key_values.{i}.key/value` and `present.{i}.key/value`, layer by layer.
    past_names: Vec<String>,
    present_names: Vec<String>,
}

impl OptimumRuntime {
    /// Loads the three graphs (weights of `dtype`) and checks them against `assets.config` (input and output names,
    /// declared shapes, vocabulary). Errors: [`Error::Bundle`] naming the graph file.
    pub fn load(assets: &ModelAssets, encoder: &Path, decoder: &Path, decoder_with_past: &Path, dtype: &'static str) -> Result<Self> {
        let cfg = &assets.config;
        let (h, w) = (assets.preprocess.size.height, assets.preprocess.size.width);
        let enc_seq = cfg.encoder.seq_len();
        let enc_dim = cfg.encoder.hidden_size;
        let (n_layer, heads, head_dim) = (cfg.decoder.n_layer, cfg.decoder.n_head, cfg.decoder.head_dim());
        let encoder = Graph::load(
            encoder,
            |_| vec![InputSpec::new(tensor::PIXEL_VALUES, f32::datum_type(), [1, 3, h, w].map(TDim::from).to_vec())],
            &[tensor::LAST_HIDDEN_STATE.to_string()],
        )?;
        let past_names = tensor::per_layer(n_layer, tensor::past_key_values);
        let present_names = tensor::per_layer(n_layer, tensor::present);
        let mut dec_outputs = vec![tensor::LOGITS.to_string()];
        dec_outputs.extend(present_names.iter().cloned());
        let ids_dtype = i64::datum_type();
        let specs = |m: &InferenceModel, with_past: bool| {
            let b = TDim::from(m.sym("B"));
            let mut v = vec![
                InputSpec::new(tensor::INPUT_IDS, ids_dtype, vec![b.clone(), 1.into()]),
                InputSpec::new(tensor::ENCODER_HIDDEN_STATES, f32::datum_type(), vec![b.clone(), enc_seq.into(), enc_dim.into()]),
            ];
            if with_past {
                let p = TDim::from(m.sym("P"));
                for name in &past_names {
                    v.push(InputSpec::new(name, f32::datum_type(), vec![b.clone(), heads.into(), p.clone(), head_dim.into()]));
                }
            }
            v
        };
        let decoder = Graph::load(decoder, |m| specs(m, false), &dec_outputs)?;
        let decoder_with_past = Graph::load(decoder_with_past, |m| specs(m, true), &dec_outputs)?;
        decoder.check_last_dim(tensor::LOGITS, cfg.decoder.vocab_size, "entries but config.json says vocab_size =")?;
        Ok(OptimumRuntime { dtype, encoder, decoder, decoder_with_past, ids_dtype, past_names, present_names })
    }
}

impl Engine for OptimumRuntime {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let out = self.encoder.run("encoder", vec![(tensor::PIXEL_VALUES, pixel_values.into_tensor().into_tvalue())])?;
        let hidden = out[self.encoder.output_index(tensor::LAST_HIDDEN_STATE)?].clone();
        Ok(Box::new(OptimumEncoding { rt: self, hidden }))
    }

    fn describe(&self) -> String {
        format!(
            "optimum layout: {}, {}, {}",
            self.encoder.path().display(),
            self.decoder.path().display(),
            self.decoder_with_past.path().display()
        )
    }

    fn dtype(&self) -> &str {
        self.dtype
    }

    fn weight_files(&self) -> Vec<PathBuf> {
        [&self.encoder, &self.decoder, &self.decoder_with_past].iter().map(|g| g.path().to_path_buf()).collect()
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
        let ids = ids_tensor(rt.ids_dtype, tokens)?;
        let mut inputs: Vec<(&str, TValue)> = vec![(tensor::INPUT_IDS, ids), (tensor::ENCODER_HIDDEN_STATES, self.hidden.clone())];
        let graph = match self.past.take() {
            None => &rt.decoder,
            Some(past) => {
                inputs.extend(rt.past_names.iter().map(String::as_str).zip(past));
                &rt.decoder_with_past
            }
        };
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
