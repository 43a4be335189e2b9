//! The project's fast layout (`vitgpt2-host export`): the encoder graph also emits every decoder
//! layer's cross-attention keys/values (`cross.{i}.key/value`, batch 1), computed once per
//! image; one decoder-step graph takes `input_ids`, `position_ids`, the self-attention cache
//! `past.{i}.key/value` (length P symbolic, 0 at the first step) and the cross keys/values, and
//! returns `logits [B, vocab]` and `present.{i}.key/value`.

use std::path::PathBuf;

use ndarray::{Array2, Array4};
use tract_onnx::prelude::*;

use super::graph::{Graph, InputSpec, OpTimes};
use super::onnx_file::OnnxFile;
use super::{gather_rows, ids_tensor, is_identity};
use crate::assets::ModelAssets;
use crate::bundle::contract::tensor;
use crate::bundle::Dtype;
use crate::engine::{Engine, ImageEncoding};
use crate::error::{chain, Error, Result};
use crate::generate::DecoderSession;

pub struct FastRuntime {
    dtype: Dtype,
    encoder: Graph,
    decoder_step: Graph,
    heads: usize,
    head_dim: usize,
    /// `past.{i}.*`, `cross.{i}.*`, `present.{i}.*`, layer by layer, key before value.
    past_names: Vec<String>,
    cross_names: Vec<String>,
    present_names: Vec<String>,
}

impl FastRuntime {
    /// Loads both graphs (weights of `dtype`) and checks them against `assets.config` (input and output names,
    /// declared shapes, vocabulary). Errors: [`Error::Bundle`] naming the graph file.
    pub fn load(assets: &ModelAssets, encoder: OnnxFile, decoder_step: OnnxFile, dtype: Dtype) -> Result<Self> {
        let cfg = &assets.config;
        let (h, w) = (assets.preprocess.size.height, assets.preprocess.size.width);
        let enc_seq = cfg.encoder.seq_len();
        let (n_layer, heads, head_dim) = (cfg.decoder.n_layer, cfg.decoder.n_head, cfg.decoder.head_dim());
        let past_names = tensor::per_layer(n_layer, tensor::past);
        let cross_names = tensor::per_layer(n_layer, tensor::cross);
        let present_names = tensor::per_layer(n_layer, tensor::present);
        let mut enc_outputs = vec![tensor::LAST_HIDDEN_STATE.to_string()];
        enc_outputs.extend(cross_names.iter().cloned());
        let mut dec_outputs = vec![tensor::LOGITS.to_string()];
        dec_outputs.extend(present_names.iter().cloned());
        let specs = |m: &InferenceModel| {
            let b = TDim::from(m.sym("B"));
            let p = TDim::from(m.sym("P"));
            let mut v = vec![
                InputSpec::new(tensor::INPUT_IDS, i64::datum_type(), vec![b.clone(), 1.into()]),
                InputSpec::new(tensor::POSITION_IDS, i64::datum_type(), vec![b.clone(), 1.into()]),
            ];
            for name in &past_names {
                v.push(InputSpec::new(name, f32::datum_type(), vec![b.clone(), heads.into(), p.clone(), head_dim.into()]));
            }
            for name in &cross_names {
                v.push(InputSpec::new(name, f32::datum_type(), vec![1.into(), heads.into(), enc_seq.into(), head_dim.into()]));
            }
            v
        };
        // On two threads where the CPU has two cores (see `parallel_load`).
        let enc_specs = |_: &InferenceModel| vec![InputSpec::new(tensor::PIXEL_VALUES, f32::datum_type(), [1, 3, h, w].map(TDim::from).to_vec())];
        let (encoder, decoder_step) = if !parallel_load() {
            (Graph::load(encoder, enc_specs, &enc_outputs)?, Graph::load(decoder_step, specs, &dec_outputs)?)
        } else {
            std::thread::scope(|scope| {
                let dec = std::thread::Builder::new()
                    .name("vitgpt2-load".into())
                    .spawn_scoped(scope, || Graph::load(decoder_step, specs, &dec_outputs))
                    .map_err(|e| Error::runtime("load", format!("cannot start a loading thread: {e}")))?;
                let enc = Graph::load(encoder, enc_specs, &enc_outputs);
                let dec = dec.join().map_err(|_| Error::runtime("load", "the thread loading the decoder graph panicked"))?;
                Ok::<_, Error>((enc?, dec?))
            })?
        };
        decoder_step.check_last_dim(tensor::LOGITS, cfg.decoder.vocab_size, "entries but config.json says vocab_size =")?;
        Ok(FastRuntime { dtype, encoder, decoder_step, heads, head_dim, past_names, cross_names, present_names })
    }

    /// The decoder-step inputs for `tokens` (one per row) at `position`, with this image's
    /// `cross` keys/values and the rows' `past`: the one place they are named and built.
    fn step_inputs<'n>(&'n self, tokens: &[u32], position: usize, past: Vec<TValue>, cross: &[TValue]) -> Result<Vec<(&'n str, TValue)>> {
        let ids = ids_tensor(i64::datum_type(), tokens)?;
        let pos = Tensor::from_shape(&[tokens.len(), 1], &vec![position as i64; tokens.len()])
            .map_err(|e| Error::runtime("decoder", chain(&e)))?
            .into_tvalue();
        let mut inputs: Vec<(&str, TValue)> = vec![(tensor::INPUT_IDS, ids), (tensor::POSITION_IDS, pos)];
        inputs.extend(self.past_names.iter().map(String::as_str).zip(past));
        inputs.extend(self.cross_names.iter().map(String::as_str).zip(cross.iter().cloned()));
        Ok(inputs)
    }

    /// An empty self-attention cache for `rows` hypotheses.
    fn empty_past(&self, rows: usize) -> Result<Vec<TValue>> {
        let empty = Tensor::zero::<f32>(&[rows, self.heads, 0, self.head_dim]).map_err(|e| Error::runtime("decoder", chain(&e)))?;
        Ok(vec![empty.into_tvalue(); self.past_names.len()])
    }

    /// Times every node (`vitgpt2-node bench --profile`): the encoder on `pixel_values`, then one
    /// decoder step of `rows` hypotheses (1: greedy) after `past` zero-filled positions. Each
    /// graph runs once to warm up, then once timed. Returns `(what, per-op times)` per graph.
    pub fn profile(&self, pixel_values: Array4<f32>, past: usize, rows: usize, by_node: bool) -> Result<Vec<(String, OpTimes)>> {
        let px = || vec![(tensor::PIXEL_VALUES, pixel_values.clone().into_tensor().into_tvalue())];
        self.encoder.profile(px(), by_node)?;
        let encoder = self.encoder.profile(px(), by_node)?;
        let out = self.encoder.run("encoder", px())?;
        let cross = self.cross_outputs(&out)?;
        let zeros = Tensor::zero::<f32>(&[rows, self.heads, past, self.head_dim]).map_err(|e| Error::runtime("profile", chain(&e)))?;
        let tokens = vec![5; rows];
        let inputs = || self.step_inputs(&tokens, past, vec![zeros.clone().into_tvalue(); self.past_names.len()], &cross);
        self.decoder_step.profile(inputs()?, by_node)?;
        let step = self.decoder_step.profile(inputs()?, by_node)?;
        let what = if rows == 1 { format!("decoder step at past {past}") } else { format!("decoder step of {rows} rows at past {past}") };
        Ok(vec![("encoder".into(), encoder), (what, step)])
    }

    fn cross_outputs(&self, out: &TVec<TValue>) -> Result<Vec<TValue>> {
        self.cross_names.iter().map(|n| Ok(out[self.encoder.output_index(n)?].clone())).collect()
    }
}

impl Engine for FastRuntime {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let out = self.encoder.run("encoder", vec![(tensor::PIXEL_VALUES, pixel_values.into_tensor().into_tvalue())])?;
        Ok(Box::new(FastEncoding { rt: self, cross: self.cross_outputs(&out)? }))
    }

    fn describe(&self) -> String {
        format!("fast layout ({}): {}, {}", self.dtype.word(), self.encoder.path().display(), self.decoder_step.path().display())
    }

    fn dtype(&self) -> &str {
        self.dtype.word()
    }

    fn weight_files(&self) -> Vec<PathBuf> {
        vec![self.encoder.path().to_path_buf(), self.decoder_step.path().to_path_buf()]
    }
}

struct FastEncoding<'a> {
    rt: &'a FastRuntime,
    /// `cross.{i}.key/value`, `[1, heads, enc_seq, head_dim]`, layer by layer, key before value.
    cross: Vec<TValue>,
}

impl ImageEncoding for FastEncoding<'_> {
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>> {
        Ok(Box::new(FastSession { rt: self.rt, cross: &self.cross, past: self.rt.empty_past(rows)?, position: 0 }))
    }
}

struct FastSession<'a> {
    rt: &'a FastRuntime,
    cross: &'a [TValue],
    /// `past.{i}.key/value`, layer by layer, key before value.
    past: Vec<TValue>,
    /// Positions already decoded (the same for every row).
    position: usize,
}

impl DecoderSession for FastSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
        let rt = self.rt;
        let g = &rt.decoder_step;
        let inputs = rt.step_inputs(tokens, self.position, std::mem::take(&mut self.past), self.cross)?;
        let out = g.run("decoder", inputs)?;
        let view = out[g.output_index(tensor::LOGITS)?].to_plain_array_view::<f32>().map_err(|e| Error::runtime("decoder", chain(&e)))?;
        let logits = view.into_dimensionality::<ndarray::Ix2>().map_err(|e| Error::runtime("decoder", format!("logits: {e}")))?.to_owned();
        self.past = rt.present_names.iter().map(|n| Ok(out[g.output_index(n)?].clone())).collect::<Result<Vec<_>>>()?;
        self.position += 1;
        Ok(logits)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if !is_identity(rows, self.past.first().map_or(0, |t| t.shape()[0])) {
            self.past = self.past.iter().map(|t| gather_rows("decoder", t, rows)).collect::<Result<Vec<_>>>()?;
        }
        Ok(())
    }
}

/// Whether the encoder and decoder graphs load at the same time, on two threads: by default where
/// the CPU has two cores or more (whatever `--threads` says: this is before any caption);
/// `VITGPT2_PARALLEL_LOAD=0` loads them one after the other, `=1` in parallel even on one core.
/// Measured on the full-size int8 bundle (README "Performance"): the load ~0.6 s shorter (1,303 →
/// 640–684 ms), peak RSS within a few MiB of one after the other (324–326 vs 322 MiB). It used to
/// cost +36–41 MiB (each graph's weights also in its protobuf, see `raw_data`; glibc keeping each
/// thread's freed blocks, see `runtime::load`), which is why it was off.
pub fn parallel_load() -> bool {
    match std::env::var("VITGPT2_PARALLEL_LOAD").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
    }
}
