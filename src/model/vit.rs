//! ViT encoder (transformers' `ViTModel`): patch embedding, CLS token, learned position
//! embeddings, pre-norm blocks, final layer norm. Names as in a `ViTModel` checkpoint.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use super::{attention, dropout, linear, merge_heads, split_heads, Activation, LayerNorm};
use crate::config::VitConfig;

/// ViT's `initializer_range` default; only used for tensors a checkpoint lacks (the pooler).
const INIT_STD: f64 = 0.02;

fn init() -> Init {
    Init::Randn { mean: 0.0, stdev: INIT_STD }
}

/// A 2-D sine-cosine table `[1, 1 + grid², hidden]` (MAE's `get_2d_sincos_pos_embed`) to
/// start the learned position embeddings from when training from scratch: with the default
/// N(0, 0.02) start, a small encoder trained on CPU was measured to leave position unlearned
/// (opposite corners' embeddings correlated 0.93), so it could not tell left from above.
/// Half the channels encode the row, half the column; the CLS slot is zero.
pub fn sincos_position_embeddings(cfg: &VitConfig) -> Result<Tensor> {
    let d = cfg.hidden_size;
    if !d.is_multiple_of(4) {
        candle_core::bail!("sin-cos position embeddings need hidden_size divisible by 4, got {d}");
    }
    let side = cfg.image_size / cfg.patch_size;
    let quarter = d / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let encode = |pos: usize, out: &mut Vec<f32>| {
        out.extend(omega.iter().map(|w| (pos as f64 * w).sin() as f32));
        out.extend(omega.iter().map(|w| (pos as f64 * w).cos() as f32));
    };
    let mut table = vec![0f32; d];
    for row in 0..side {
        for col in 0..side {
            encode(row, &mut table);
            encode(col, &mut table);
        }
    }
    Tensor::from_vec(table, (1, side * side + 1, d), &candle_core::Device::Cpu)
}

#[derive(Debug, Clone)]
pub struct VitEmbeddings {
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// The 16x16 stride-16 convolution's kernel `[hidden, channels, patch, patch]`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    patch_size: usize,
    image_size: usize,
    dropout: f64,
}

impl VitEmbeddings {
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", init())?;
        let position_embeddings = vb.get_with_hints((1, cfg.seq_len(), d), "position_embeddings", init())?;
        let proj = vb.pp("patch_embeddings").pp("projection");
        let patch_weight = proj.get_with_hints((d, cfg.num_channels, p, p), "weight", init())?;
        let patch_bias = proj.get_with_hints(d, "bias", Init::Const(0.0))?;
        Ok(Self {
            cls_token,
            position_embeddings,
            patch_weight,
            patch_bias,
            patch_size: p,
            image_size: cfg.image_size,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if h != self.image_size || w != self.image_size {
            candle_core::bail!("pixel_values are {h}x{w} but the encoder expects {0}x{0} (config image_size)", self.image_size);
        }
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let d = self.patch_weight.dim(0)?;
        // The kernel == stride convolution over non-overlapping patches is one matmul:
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B*gh*gw, C*p*p] x [C*p*p, D].
        let patches = pixel_values
            .reshape(vec![b, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let kernel = self.patch_weight.reshape((d, c * p * p))?;
        let emb = patches.matmul(&kernel.t()?)?.broadcast_add(&self.patch_bias)?.reshape((b, gh * gw, d))?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &emb], 1)?.broadcast_add(&self.position_embeddings)?;
        dropout(&x, self.dropout, train)
    }
}

#[derive(Debug, Clone)]
pub struct VitAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    heads: usize,
    attn_dropout: f64,
    hidden_dropout: f64,
}

impl VitAttention {
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let att = vb.pp("attention");
        Ok(Self {
            query: linear(d, d, init(), cfg.qkv_bias, att.pp("query"))?,
            key: linear(d, d, init(), cfg.qkv_bias, att.pp("key"))?,
            value: linear(d, d, init(), cfg.qkv_bias, att.pp("value"))?,
            dense: linear(d, d, init(), true, vb.pp("output").pp("dense"))?,
            heads: cfg.num_attention_heads,
            attn_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let k = split_heads(&self.key.forward(x)?, self.heads)?;
        let v = split_heads(&self.value.forward(x)?, self.heads)?;
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let ctx = merge_heads(&attention(&q, &k, &v, scale, None, self.attn_dropout, train)?)?;
        dropout(&self.dense.forward(&ctx)?, self.hidden_dropout, train)
    }
}

/// `ViTLayer`: x + attn(ln_before(x)), then + mlp(ln_after(x)).
#[derive(Debug, Clone)]
pub struct VitLayer {
    layernorm_before: LayerNorm,
    attention: VitAttention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    act: Activation,
    dropout: f64,
}

impl VitLayer {
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let act = Activation::from_name(&cfg.hidden_act).map_err(|e| candle_core::Error::Msg(format!("encoder.hidden_act: {e}")))?;
        Ok(Self {
            layernorm_before: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("layernorm_before"))?,
            attention: VitAttention::load(vb.pp("attention"), cfg)?,
            layernorm_after: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("layernorm_after"))?,
            intermediate: linear(d, cfg.intermediate_size, init(), true, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, d, init(), true, vb.pp("output").pp("dense"))?,
            act,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = (x + self.attention.forward(&self.layernorm_before.forward(x)?, train)?)?;
        let h = self.act.apply(&self.intermediate.forward(&self.layernorm_after.forward(&x)?)?)?;
        let h = dropout(&self.output.forward(&h)?, self.dropout, train)?;
        x + h
    }
}

/// `ViTModel`. The pooler is loaded and saved so that checkpoints round-trip, but captioning
/// uses the last hidden state only (as `VisionEncoderDecoderModel` does).
#[derive(Debug, Clone)]
pub struct Vit {
    embeddings: VitEmbeddings,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    pooler: Option<Linear>,
}

impl Vit {
    pub fn load(vb: VarBuilder, cfg: &VitConfig, with_pooler: bool) -> Result<Self> {
        let embeddings = VitEmbeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VitLayer::load(vb.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let layernorm = LayerNorm::load(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        let pooler = if with_pooler {
            Some(linear(cfg.hidden_size, cfg.hidden_size, init(), true, vb.pp("pooler").pp("dense"))?)
        } else {
            None
        };
        Ok(Self { embeddings, layers, layernorm, pooler })
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// `last_hidden_state`: `[batch, patches + 1, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixel_values, train)?;
        for layer in &self.layers {
            x = layer.forward(&x, train)?;
        }
        self.layernorm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    }

    #[test]
    fn sincos_table_tells_positions_apart() {
        let cfg = VitConfig { hidden_size: 96, image_size: 64, patch_size: 8, ..VitConfig::default() };
        let t = sincos_position_embeddings(&cfg).unwrap();
        assert_eq!(t.dims(), &[1, 65, 96]);
        let rows: Vec<Vec<f32>> = t.squeeze(0).unwrap().to_vec2().unwrap();
        assert!(rows[0].iter().all(|&v| v == 0.0), "CLS slot is zero");
        // Patch (row 0, col 1) is slot 2: the row half holds sin(0)=0 / cos(0)=1, the column
        // half sin(1·ω_k) / cos(1·ω_k) with ω_0 = 1.
        assert_eq!(rows[2][0], 0.0);
        assert_eq!(rows[2][24], 1.0);
        assert!((rows[2][48] - 1f32.sin()).abs() < 1e-7 && (rows[2][72] - 1f32.cos()).abs() < 1e-7);
        // Opposite corners (0,0) and (7,7) are far apart, neighbours close: cosine similarity
        // drops with distance. (From the N(0, 0.02) start, the trained demo's opposite corners
        // still correlated 0.93.)
        let (corner, next, far) = (&rows[1], &rows[2], &rows[64]);
        assert!(cosine(corner, next) > 0.9, "neighbours {}", cosine(corner, next));
        assert!(cosine(corner, far) < 0.75, "opposite corners {}", cosine(corner, far));
        // Every patch has its own code.
        for i in 1..65 {
            for j in (i + 1)..65 {
                assert!(cosine(&rows[i], &rows[j]) < 0.999, "slots {i} and {j} coincide");
            }
        }
    }
}
