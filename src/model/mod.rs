//! The host model: ViT-GPT2 (transformers' `VisionEncoderDecoderModel` with a ViT encoder and a
//! GPT-2 decoder) in candle, for training and export.
//!
//! Tensor names, shapes and hyper-parameters are Hugging Face's, so checkpoints load and save
//! without conversion ([`checkpoint`]). Every op used in training has a backward pass in candle:
//! the fused `candle_nn::ops::layer_norm`/`softmax_last_dim` kernels have none (gradients stop
//! silently), so layer norm and softmax are written from basic ops here.

pub mod checkpoint;
pub mod commands;
pub mod engine;
pub mod flax;
pub mod format;
pub mod gpt2;
pub mod report;
pub mod ved;
pub mod vit;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

pub use checkpoint::LoadReport;
pub use engine::{open_checkpoint, CandleEngine};
pub use ved::{caption_loss, shift_tokens_right, DecoderCache, HostSession, VisionEncoderDecoder};

/// The device the host model runs on: the first CUDA GPU when built with `cuda`, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// `nn.LayerNorm` from basic ops (differentiable, unlike candle's fused kernel).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 also when the model computes in bf16 (mixed precision); every
        // cast is a no-op in f32.
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        // Biased variance, as torch.
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?.broadcast_add(&self.bias.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

/// `nn.Linear`: weight `[out, in]`. `init` is used only when a checkpoint lacks the weight.
pub fn linear(in_dim: usize, out_dim: usize, init: Init, bias: bool, vb: VarBuilder) -> Result<candle_nn::Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(candle_nn::Linear::new(w, b))
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]` (transposed vs nn.Linear).
#[derive(Debug, Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    pub fn load(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((in_dim, out_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A plain 2-D matmul (no broadcast matmul, which is slow on CPU and CUDA).
        let dims = x.dims().to_vec();
        let last = dims[dims.len() - 1];
        let rows = x.elem_count() / last;
        let y = x.reshape((rows, last))?.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        let mut out = dims;
        let n = out.len();
        out[n - 1] = self.weight.dim(1)?;
        y.reshape(out)
    }
}

/// Activation functions by their transformers name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `gelu`: exact, with erf (ViT).
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation (GPT-2).
    GeluTanh,
    Relu,
}

impl Activation {
    /// The activation a config names. Errors: [`crate::error::Error::Invalid`] for a name this
    /// model does not implement (callers add the config field).
    pub fn from_name(name: &str) -> crate::error::Result<Self> {
        match name {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(crate::error::Error::Invalid(format!("activation `{other}` is not supported (use gelu, gelu_new or relu)"))),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluErf => x.gelu_erf(),
            // candle's gelu is 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), transformers' gelu_new.
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// Dropout in training, identity in evaluation.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(x, p as f32)
    } else {
        Ok(x.clone())
    }
}

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors, with an optional
/// additive mask broadcast over batch and heads. Differentiable softmax (not softmax_last_dim).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>, p_drop: f64, train: bool) -> Result<Tensor> {
    // Mask and softmax in f32 also when the model computes in bf16 (no-op casts in f32).
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
    let probs = dropout(&probs, p_drop, train)?;
    probs.matmul(v)
}

/// `[batch, seq, heads * head_dim]` -> `[batch, heads, seq, head_dim]`, contiguous for matmul.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous()
}

/// The inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))
}

/// Additive causal mask `[q_len, past + q_len]`: query i (at position past + i) sees keys 0..=past + i.
pub fn causal_mask(q_len: usize, past: usize, device: &Device) -> Result<Tensor> {
    position_mask(q_len, past, past + q_len, device)
}

/// Additive mask `[q_len, k_len]` (0 or −∞, f32): query i, at position `first + i`, sees keys
/// 0..=first + i. GPT-2's causal self-attention ([`causal_mask`]) and the original ViT-GPT2's
/// cross-attention over the image tokens (`cross_attention_causal`, `k_len` = image tokens; a row
/// always keeps key 0, CLS, so no row is all −∞).
pub fn position_mask(q_len: usize, first: usize, k_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| if j > first + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (q_len, k_len), device)
}
