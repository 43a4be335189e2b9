//! GPT-2 decoder with cross-attention (transformers' `GPT2LMHeadModel` with
//! `add_cross_attention`): learned positions, pre-norm blocks (causal self-attention,
//! cross-attention to the encoder output, gelu_new MLP), final layer norm, LM head tied to the
//! token embedding. Names as in a `GPT2LMHeadModel` checkpoint (`transformer.h.N.…`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::{attention, causal_mask, dropout, merge_heads, position_mask, split_heads, Activation, Conv1D, LayerNorm};
use crate::config::Gpt2Config;

/// Attention scale: 1/sqrt(head_dim) (`scale_attn_weights`), divided by layer_idx + 1 when
/// `scale_attn_by_inverse_layer_idx` (GPT-2's definition, as transformers' eager attention).
fn attention_scale(cfg: &Gpt2Config, layer_idx: usize) -> f64 {
    let mut s = 1.0;
    if cfg.scale_attn_weights {
        s /= (cfg.head_dim() as f64).sqrt();
    }
    if cfg.scale_attn_by_inverse_layer_idx {
        s /= (layer_idx + 1) as f64;
    }
    // reorder_and_upcast_attn only changes where the scale is applied and the precision of
    // the product (float32 upcast): the same numbers in float32, so nothing to do.
    s
}

/// Keys and values of one attention layer, `[batch, heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KeyValues {
    pub k: Tensor,
    pub v: Tensor,
}

impl KeyValues {
    fn index_rows(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self { k: self.k.index_select(rows, 0)?, v: self.v.index_select(rows, 0)? })
    }
}

/// Causal self-attention (`attn`): fused q,k,v projection `c_attn`, output `c_proj`.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    heads: usize,
    scale: f64,
    attn_pdrop: f64,
    resid_pdrop: f64,
}

impl SelfAttention {
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config, layer_idx: usize) -> Result<Self> {
        let d = cfg.n_embd;
        Ok(Self {
            c_attn: Conv1D::load(d, 3 * d, cfg.initializer_range, vb.pp("c_attn"))?,
            c_proj: Conv1D::load(d, d, proj_std(cfg), vb.pp("c_proj"))?,
            heads: cfg.n_head,
            scale: attention_scale(cfg, layer_idx),
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    /// `past`: this layer's cache, extended in place with the new keys/values.
    pub fn forward(&self, x: &Tensor, past: Option<&mut Option<KeyValues>>, train: bool) -> Result<Tensor> {
        let d = x.dim(2)?;
        let qkv = self.c_attn.forward(x)?;
        let q = split_heads(&qkv.narrow(2, 0, d)?, self.heads)?;
        let mut k = split_heads(&qkv.narrow(2, d, d)?, self.heads)?;
        let mut v = split_heads(&qkv.narrow(2, 2 * d, d)?, self.heads)?;
        let mut past_len = 0;
        if let Some(cache) = past {
            if let Some(prev) = cache.as_ref() {
                past_len = prev.k.dim(2)?;
                k = Tensor::cat(&[&prev.k, &k], 2)?;
                v = Tensor::cat(&[&prev.v, &v], 2)?;
            }
            *cache = Some(KeyValues { k: k.clone(), v: v.clone() });
        }
        let q_len = q.dim(2)?;
        // A single new token may see every cached position: no mask needed.
        let mask = if q_len > 1 { Some(causal_mask(q_len, past_len, x.device())?) } else { None };
        let ctx = merge_heads(&attention(&q, &k, &v, self.scale, mask.as_ref(), self.attn_pdrop, train)?)?;
        dropout(&self.c_proj.forward(&ctx)?, self.resid_pdrop, train)
    }
}

/// Cross-attention (`crossattention`): queries `q_attn` from the decoder, keys and values
/// `c_attn` (fused k,v) from the encoder output, output `c_proj`. No mask, except with
/// `cross_attention_causal` (the original ViT-GPT2): the query at position t sees encoder
/// positions 0..=t.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    q_attn: Conv1D,
    c_attn: Conv1D,
    c_proj: Conv1D,
    heads: usize,
    scale: f64,
    attn_pdrop: f64,
    resid_pdrop: f64,
    causal: bool,
}

impl CrossAttention {
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config, layer_idx: usize) -> Result<Self> {
        let d = cfg.n_embd;
        Ok(Self {
            q_attn: Conv1D::load(d, d, cfg.initializer_range, vb.pp("q_attn"))?,
            c_attn: Conv1D::load(d, 2 * d, cfg.initializer_range, vb.pp("c_attn"))?,
            c_proj: Conv1D::load(d, d, proj_std(cfg), vb.pp("c_proj"))?,
            heads: cfg.n_head,
            scale: attention_scale(cfg, layer_idx),
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
            causal: cfg.cross_attention_causal,
        })
    }

    /// Keys and values of the encoder output `[batch, enc_len, n_embd]`: computed once per image.
    pub fn key_values(&self, encoder_hidden: &Tensor) -> Result<KeyValues> {
        let d = encoder_hidden.dim(2)?;
        let kv = self.c_attn.forward(encoder_hidden)?;
        Ok(KeyValues { k: split_heads(&kv.narrow(2, 0, d)?, self.heads)?, v: split_heads(&kv.narrow(2, d, d)?, self.heads)? })
    }

    /// `x` `[batch, len, n_embd]` holds decoder positions `first..first + len`.
    pub fn forward(&self, x: &Tensor, kv: &KeyValues, first: usize, train: bool) -> Result<Tensor> {
        let q = split_heads(&self.q_attn.forward(x)?, self.heads)?;
        let mask = if self.causal { Some(position_mask(q.dim(2)?, first, kv.k.dim(2)?, x.device())?) } else { None };
        let ctx = merge_heads(&attention(&q, &kv.k, &kv.v, self.scale, mask.as_ref(), self.attn_pdrop, train)?)?;
        dropout(&self.c_proj.forward(&ctx)?, self.resid_pdrop, train)
    }
}

/// GPT-2 scales the residual projections' initialisation by 1/sqrt(2 * n_layer).
fn proj_std(cfg: &Gpt2Config) -> f64 {
    cfg.initializer_range / (2.0 * cfg.n_layer as f64).sqrt()
}

#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
    resid_pdrop: f64,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let act = Activation::from_name(&cfg.activation_function)
            .map_err(|e| candle_core::Error::Msg(format!("decoder.activation_function: {e}")))?;
        Ok(Self {
            c_fc: Conv1D::load(cfg.n_embd, cfg.inner_dim(), cfg.initializer_range, vb.pp("c_fc"))?,
            c_proj: Conv1D::load(cfg.inner_dim(), cfg.n_embd, proj_std(cfg), vb.pp("c_proj"))?,
            act,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.act.apply(&self.c_fc.forward(x)?)?;
        dropout(&self.c_proj.forward(&h)?, self.resid_pdrop, train)
    }
}

/// `GPT2Block` with cross-attention.
#[derive(Debug, Clone)]
pub struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_cross_attn: LayerNorm,
    crossattention: CrossAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config, layer_idx: usize) -> Result<Self> {
        let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: LayerNorm::load(d, eps, vb.pp("ln_1"))?,
            attn: SelfAttention::load(vb.pp("attn"), cfg, layer_idx)?,
            ln_cross_attn: LayerNorm::load(d, eps, vb.pp("ln_cross_attn"))?,
            crossattention: CrossAttention::load(vb.pp("crossattention"), cfg, layer_idx)?,
            ln_2: LayerNorm::load(d, eps, vb.pp("ln_2"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    /// `x` holds decoder positions `first..` (`first` = the cached length, 0 without a cache).
    pub fn forward(&self, x: &Tensor, cross: &KeyValues, past: Option<&mut Option<KeyValues>>, first: usize, train: bool) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, past, train)?)?;
        let x = (&x + self.crossattention.forward(&self.ln_cross_attn.forward(&x)?, cross, first, train)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x)?, train)?
    }
}

/// Per-layer key/value cache for incremental decoding: self-attention grows by one position
/// per step, cross-attention keys/values are computed once from the encoder output.
#[derive(Debug, Clone)]
pub struct Gpt2Cache {
    self_kv: Vec<Option<KeyValues>>,
    cross_kv: Vec<KeyValues>,
}

impl Gpt2Cache {
    /// Positions already decoded.
    pub fn len(&self) -> Result<usize> {
        match self.self_kv.first() {
            Some(Some(kv)) => kv.k.dim(2),
            _ => Ok(0),
        }
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Keeps rows `rows` (beam search): `rows` is a u32 index tensor.
    pub fn index_rows(&mut self, rows: &Tensor) -> Result<()> {
        for kv in self.self_kv.iter_mut().flatten() {
            *kv = kv.index_rows(rows)?;
        }
        for kv in self.cross_kv.iter_mut() {
            *kv = kv.index_rows(rows)?;
        }
        Ok(())
    }
}

/// `GPT2LMHeadModel` with cross-attention; the LM head is the token embedding (tied).
#[derive(Debug, Clone)]
pub struct Gpt2LmHead {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    embd_pdrop: f64,
    n_positions: usize,
}

impl Gpt2LmHead {
    /// `vb` points at the `GPT2LMHeadModel` (its tensors are under `transformer.`).
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let t = vb.pp("transformer");
        let std = Init::Randn { mean: 0.0, stdev: cfg.initializer_range };
        let wte = t.get_with_hints((cfg.vocab_size, cfg.n_embd), "wte.weight", std)?;
        let wpe = t.get_with_hints((cfg.n_positions, cfg.n_embd), "wpe.weight", std)?;
        let h = (0..cfg.n_layer).map(|i| Block::load(t.pp("h").pp(i), cfg, i)).collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(cfg.n_embd, cfg.layer_norm_epsilon, t.pp("ln_f"))?;
        Ok(Self { wte, wpe, h, ln_f, embd_pdrop: cfg.embd_pdrop, n_positions: cfg.n_positions })
    }

    /// The token embedding, which is also the LM head.
    pub fn wte(&self) -> &Tensor {
        &self.wte
    }

    fn embed(&self, input_ids: &Tensor, past_len: usize, train: bool) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if past_len + t > self.n_positions {
            candle_core::bail!("decoder input of {} positions exceeds n_positions ({})", past_len + t, self.n_positions);
        }
        let d = self.wte.dim(1)?;
        let tok = self.wte.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, d))?;
        let pos = self.wpe.narrow(0, past_len, t)?;
        dropout(&tok.broadcast_add(&pos)?, self.embd_pdrop, train)
    }

    fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let x = self.ln_f.forward(x)?;
        x.reshape((b * t, d))?.matmul(&self.wte.t()?)?.reshape((b, t, ()))
    }

    /// Teacher-forced pass: `input_ids` `[batch, len]` (u32), `encoder_hidden`
    /// `[batch, enc_len, n_embd]`; returns logits `[batch, len, vocab]`.
    pub fn forward(&self, input_ids: &Tensor, encoder_hidden: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.embed(input_ids, 0, train)?;
        for block in &self.h {
            let cross = block.crossattention.key_values(encoder_hidden)?;
            x = block.forward(&x, &cross, None, 0, train)?;
        }
        self.lm_head(&x)
    }

    /// An empty cache for `encoder_hidden` `[batch, enc_len, n_embd]`: the cross-attention
    /// keys/values of every layer, computed here once.
    pub fn start_cache(&self, encoder_hidden: &Tensor) -> Result<Gpt2Cache> {
        let cross_kv = self.h.iter().map(|b| b.crossattention.key_values(encoder_hidden)).collect::<Result<Vec<_>>>()?;
        Ok(Gpt2Cache { self_kv: vec![None; self.h.len()], cross_kv })
    }

    /// Incremental pass (evaluation): feeds `input_ids` `[batch, new]` after the cached
    /// positions and returns their logits `[batch, new, vocab]`.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut Gpt2Cache) -> Result<Tensor> {
        let first = cache.len()?;
        let mut x = self.embed(input_ids, first, false)?;
        for (i, block) in self.h.iter().enumerate() {
            x = block.forward(&x, &cache.cross_kv[i], Some(&mut cache.self_kv[i]), first, false)?;
        }
        self.lm_head(&x)
    }
}
