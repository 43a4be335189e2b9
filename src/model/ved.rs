//! `VisionEncoderDecoderModel`: the ViT encoder, an optional `enc_to_dec_proj` (when the
//! encoder is narrower or wider than the decoder), the GPT-2 decoder; the caption loss; and the
//! incremental decoder session that plugs into [`crate::generate`].

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{Init, Linear, VarBuilder};
use ndarray::Array2;

use super::gpt2::{Gpt2Cache, Gpt2LmHead};
use super::vit::Vit;
use crate::assets::SpecialTokens;
use crate::config::ModelConfig;
use crate::generate::DecoderSession;

/// The decoder's key/value cache (see [`Gpt2Cache`]).
pub type DecoderCache = Gpt2Cache;

pub struct VisionEncoderDecoder {
    pub config: ModelConfig,
    encoder: Vit,
    enc_to_dec_proj: Option<Linear>,
    decoder: Gpt2LmHead,
    /// Every parameter by its Hugging Face name (what is trained and saved).
    pub(crate) params: BTreeMap<String, Var>,
    /// config.json as read (or built), kept so that saving preserves fields this crate ignores.
    pub(crate) raw_config: serde_json::Value,
    device: Device,
}

impl VisionEncoderDecoder {
    /// Builds the modules from `vb` (names under `encoder.`, `decoder.`, `enc_to_dec_proj.`).
    /// Loading and saving checkpoints is in [`super::checkpoint`].
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, with_pooler: bool) -> Result<Self> {
        let encoder = Vit::load(vb.pp("encoder"), &cfg.encoder, with_pooler)?;
        let (enc_d, dec_d) = (cfg.encoder.hidden_size, cfg.decoder.n_embd);
        // transformers adds the projection exactly when the widths differ.
        let enc_to_dec_proj = if enc_d != dec_d {
            let init = Init::Randn { mean: 0.0, stdev: cfg.decoder.initializer_range };
            Some(super::linear(enc_d, dec_d, init, true, vb.pp("enc_to_dec_proj"))?)
        } else {
            None
        };
        let decoder = Gpt2LmHead::load(vb.pp("decoder"), &cfg.decoder)?;
        Ok(Self {
            config: cfg.clone(),
            encoder,
            enc_to_dec_proj,
            decoder,
            params: BTreeMap::new(),
            raw_config: serde_json::Value::Null,
            device: vb.device().clone(),
        })
    }

    /// The same model computing in `dtype` (bf16 for mixed-precision training): every weight is
    /// this model's f32 parameter cast inside the autograd graph, so gradients land on the f32
    /// master weights. Rebuild it after each optimizer step (the casts are copies).
    pub fn compute_view(&self, dtype: DType) -> Result<VisionEncoderDecoder> {
        let tensors = self.params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?))).collect::<Result<std::collections::HashMap<_, _>>>()?;
        let with_pooler = tensors.keys().any(|n| n.starts_with("encoder.pooler."));
        let vb = VarBuilder::from_tensors(tensors, dtype, &self.device);
        // Not saved (no params, no raw config): checkpoints come from the f32 model.
        Self::load(vb, &self.config, with_pooler)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every parameter, by name.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// The parameters that take part in captioning, for the optimizer: all but the ViT pooler,
    /// which `VisionEncoderDecoderModel` keeps but never uses (it gets no gradient).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.params.iter().filter(|(n, _)| !n.starts_with("encoder.pooler.")).map(|(_, v)| v.clone()).collect()
    }

    /// Overwrites one parameter (same shape) by name.
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        match self.params.get(name) {
            Some(v) => v.set(&value.to_dtype(v.dtype())?.to_device(v.device())?),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    /// Encoder output as the decoder sees it (after `enc_to_dec_proj`): `[batch, enc_len, n_embd]`.
    pub fn encode(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.encoder.forward(pixel_values, train)?;
        match &self.enc_to_dec_proj {
            Some(p) => p.forward(&h),
            None => Ok(h),
        }
    }

    /// Teacher-forced logits `[batch, len, vocab]` for `decoder_input_ids` `[batch, len]` (u32).
    pub fn forward(&self, pixel_values: &Tensor, decoder_input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let enc = self.encode(pixel_values, train)?;
        self.decoder.forward(decoder_input_ids, &enc, train)
    }

    /// As [`Self::forward`] with the ViT frozen: its output is detached, so no gradient flows
    /// into the encoder (`enc_to_dec_proj` and the decoder still train).
    pub fn forward_frozen_encoder(&self, pixel_values: &Tensor, decoder_input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.encoder.forward(pixel_values, false)?.detach();
        let enc = match &self.enc_to_dec_proj {
            Some(p) => p.forward(&h)?,
            None => h,
        };
        self.decoder.forward(decoder_input_ids, &enc, train)
    }

    /// Loss and logits for `labels` (one row per image, -100 = ignored), as transformers trains
    /// it: decoder inputs are the labels shifted right after `special.decoder_start`, ignored
    /// positions filled with `special.pad`. With `freeze_encoder`, no gradient reaches the ViT.
    pub fn loss(&self, pixel_values: &Tensor, labels: &[Vec<i64>], special: &SpecialTokens, train: bool, freeze_encoder: bool) -> Result<(Tensor, Tensor)> {
        let inputs = shift_tokens_right(labels, special.decoder_start, special.pad)?;
        let t = labels.first().map(|r| r.len()).unwrap_or(0);
        let flat: Vec<u32> = inputs.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (labels.len(), t), &self.device)?;
        let labels = Tensor::from_vec(labels.concat(), (labels.len(), t), &self.device)?;
        let logits = if freeze_encoder {
            self.forward_frozen_encoder(pixel_values, &ids, train)?
        } else {
            self.forward(pixel_values, &ids, train)?
        };
        Ok((caption_loss(&logits, &labels)?, logits))
    }

    /// An empty decoder cache for `encoder_hidden` (from [`Self::encode`]).
    pub fn start_cache(&self, encoder_hidden: &Tensor) -> Result<DecoderCache> {
        self.decoder.start_cache(encoder_hidden)
    }

    /// Logits `[batch, new, vocab]` for `input_ids` `[batch, new]` following the cached positions.
    pub fn decode_cached(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        self.decoder.forward_cached(input_ids, cache)
    }

    /// A generation session over `rows` hypotheses for one image (`encoder_hidden` `[1, enc_len, n_embd]`).
    pub fn session(&self, encoder_hidden: &Tensor, rows: usize) -> Result<HostSession<'_>> {
        let enc = encoder_hidden.repeat((rows, 1, 1))?;
        Ok(HostSession { model: self, cache: self.start_cache(&enc)? })
    }
}

/// transformers' `shift_tokens_right`: `[start, labels[..-1]]` with -100 replaced by `pad`.
pub fn shift_tokens_right(labels: &[Vec<i64>], start: u32, pad: u32) -> Result<Vec<Vec<u32>>> {
    let t = labels.first().map(|r| r.len()).unwrap_or(0);
    labels
        .iter()
        .map(|row| {
            if row.len() != t {
                candle_core::bail!("label rows have different lengths ({} and {t}); pad them with -100", row.len());
            }
            let mut out = Vec::with_capacity(t);
            if t > 0 {
                out.push(start);
            }
            for &l in row.iter().take(t.saturating_sub(1)) {
                out.push(match l {
                    -100 => pad,
                    l if l >= 0 && l <= u32::MAX as i64 => l as u32,
                    l => candle_core::bail!("label {l} is not a token id (use -100 for ignored positions)"),
                });
            }
            Ok(out)
        })
        .collect()
}

/// Mean cross-entropy of `logits` `[batch, len, vocab]` against `labels` `[batch, len]` (i64,
/// -100 ignored), position by position: the decoder inputs are already shifted, so logits[t]
/// predicts labels[t]. (transformers 4.57's `VisionEncoderDecoderModel` shifts a second time,
/// a regression: huggingface/transformers#40111.)
pub fn caption_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    // The loss in f32 also when the model computes in bf16.
    let logits = logits.reshape((b * t, v))?.to_dtype(DType::F32)?;
    let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
    let keep = labels.ge(0i64)?;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weight = keep.to_dtype(logits.dtype())?;
    let count = weight.sum_all()?;
    (picked * weight)?.sum_all()?.neg()?.broadcast_div(&count)
}

/// Incremental decoding over one image for [`crate::generate::generate`].
pub struct HostSession<'a> {
    model: &'a VisionEncoderDecoder,
    cache: DecoderCache,
}

fn runtime_err(e: candle_core::Error) -> crate::Error {
    crate::Error::runtime("candle decoder", e)
}

impl DecoderSession for HostSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> crate::Result<Array2<f32>> {
        let mut run = || -> Result<Array2<f32>> {
            let ids = Tensor::new(tokens, self.model.device())?.reshape((tokens.len(), 1))?;
            let logits = self.model.decode_cached(&ids, &mut self.cache)?;
            let (rows, _, vocab) = logits.dims3()?;
            let flat: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Array2::from_shape_vec((rows, vocab), flat).map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        run().map_err(runtime_err)
    }

    fn reorder(&mut self, rows: &[usize]) -> crate::Result<()> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::new(idx.as_slice(), self.model.device()).map_err(runtime_err)?;
        self.cache.index_rows(&idx).map_err(runtime_err)
    }
}
