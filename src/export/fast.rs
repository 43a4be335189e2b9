//! The project's fast graph layout and the weight forms (fp32, int8) shared by every layout.
//!
//! - `encoder_fast.onnx`: `pixel_values [1,3,H,W]` → `last_hidden_state [1,S,D_enc]` and, for
//!   every decoder layer i, the cross-attention `cross.{i}.key/value [1,heads,S,head_dim]`
//!   (after `enc_to_dec_proj` when the model has one), computed once per image.
//! - `decoder_step.onnx`: `input_ids [B,1]`, `position_ids [B,1]` (int64),
//!   `past.{i}.key/value [B,heads,P,head_dim]` (P symbolic, 0 at the first step) and the cross
//!   keys/values (batch 1; the B hypotheses become the rows of one product per head) →
//!   `logits [B,vocab]` and `present.{i}.key/value [B,heads,P+1,head_dim]`.
//!
//! Attention scales are folded into the query weights; the LM head is the transposed token
//! embedding (one stored tensor).

use std::collections::HashMap;

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::ModelProto;

use super::onnx::{Attr, Dim, GraphBuilder};
use super::Weights;
use crate::bundle::contract::{self, tensor};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Activation;

/// How matrix weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    Fp32,
    /// int8 per output channel, symmetric; activations quantized per row and call, symmetric
    /// (→ MatMulInteger without zero points → scales). With `reduce_range` the weights use 7
    /// bits, within ±64 (onnxruntime's `quantize_dynamic(reduce_range=True)`): on x86-64 AVX2
    /// without VNNI the node's products then run one `vpmaddubsw` pass, exact (no i16
    /// saturation), at the cost of one bit of weight precision (`runtime::int8_gemv`).
    Int8 { reduce_range: bool },
}

impl WeightForm {
    /// int8 at full range (±127).
    pub const INT8: WeightForm = WeightForm::Int8 { reduce_range: false };

    /// The largest quantized weight magnitude: 127, or 64 with `reduce_range` (so that any two
    /// weights sum to at most 128 in magnitude: see `runtime::int8_gemv::GemvWeights::narrow`).
    pub fn weight_max(self) -> f32 {
        match self {
            WeightForm::Int8 { reduce_range: true } => 64.0,
            _ => 127.0,
        }
    }
}

/// Per-output-channel symmetric int8 of a `[din, dout]` matrix within ±`qmax` (127, or 64 for 7
/// bits): values and one scale per column (max|column| / qmax).
pub fn quantize_columns(w: &[f32], din: usize, dout: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let mut scale = vec![0f32; dout];
    for r in 0..din {
        for c in 0..dout {
            scale[c] = scale[c].max(w[r * dout + c].abs());
        }
    }
    for s in scale.iter_mut() {
        *s = if *s > 0.0 { *s / qmax } else { 1.0 };
    }
    let q = (0..din * dout).map(|i| (w[i] / scale[i % dout]).round().clamp(-qmax, qmax) as i8).collect();
    (q, scale)
}

/// Per-row symmetric int8 of a `[rows, cols]` matrix within ±`qmax` (the token embedding: a row
/// is a vocab entry).
pub fn quantize_rows(w: &[f32], rows: usize, cols: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(rows * cols);
    let mut scale = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if m > 0.0 { m / qmax } else { 1.0 };
        q.extend(row.iter().map(|v| (v / s).round().clamp(-qmax, qmax) as i8));
        scale.push(s);
    }
    (q, scale)
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// A graph under construction with the weight form applied to every linear layer.
pub struct Net<'w> {
    pub g: GraphBuilder,
    pub form: WeightForm,
    w: &'w Weights,
    /// int8 values and per-row scales per quantized activation (shared by q, k and v).
    quantized: HashMap<String, (String, String)>,
    /// Shared constants of the activation quantization.
    consts: Vec<String>,
}

impl<'w> Net<'w> {
    pub fn new(name: &str, form: WeightForm, w: &'w Weights) -> Self {
        Net { g: GraphBuilder::new(name), form, w, quantized: HashMap::new(), consts: Vec::new() }
    }

    pub fn get(&self, name: &str) -> Result<&'w (Vec<usize>, Vec<f32>)> {
        self.w.get(name)
    }

    pub fn f32_init(&mut self, name: &str) -> Result<String> {
        let (dims, data) = self.get(name)?;
        Ok(self.g.init_f32(name, dims, data))
    }

    /// `x [.., din] · w [din, dout] + b`, in the weight form.
    pub fn linear(&mut self, x: &str, name: &str, w: &[f32], din: usize, dout: usize, b: &[f32]) -> String {
        let bias = self.g.init_f32(&format!("{name}.bias"), &[dout], b);
        match self.form {
            WeightForm::Fp32 => {
                let wn = self.g.init_f32(&format!("{name}.weight"), &[din, dout], w);
                let y = self.g.node("MatMul", &[x, &wn], vec![]);
                self.g.node("Add", &[&y, &bias], vec![])
            }
            WeightForm::Int8 { .. } => {
                let (q, s) = quantize_columns(w, din, dout, self.form.weight_max());
                let wq = self.g.init_i8(&format!("{name}.weight_int8"), &[din, dout], &q);
                let ws = self.g.init_f32(&format!("{name}.weight_scale"), &[dout], &s);
                let y = self.matmul_int8(x, &wq, &ws);
                self.g.node("Add", &[&y, &bias], vec![])
            }
        }
    }

    /// One linear layer over concatenated weights, split into `parts` equal outputs: the query,
    /// key and value projections as one node and one wider product for runtimes that keep it
    /// fused. (tract's optimizer splits it back per part: neutral there, measured. The quantized
    /// input is shared either way, through `quantized`.)
    #[allow(clippy::too_many_arguments)]
    pub fn linear_split(&mut self, x: &str, name: &str, w: &[f32], din: usize, dout: usize, b: &[f32], parts: usize) -> Vec<String> {
        let y = self.linear(x, name, w, din, dout, b);
        let sizes = self.g.shape_const(&vec![(dout / parts) as i64; parts]);
        let outs = self.g.fresh_names("split", parts);
        let refs: Vec<&str> = outs.iter().map(|s| s.as_str()).collect();
        self.g.node_multi("Split", &[&y, &sizes], &refs, vec![("axis", Attr::Int(-1))]);
        outs
    }

    /// `x · wq` with `wq` int8 `[din, dout]` and per-column scales `ws [dout]`, f32 out.
    ///
    /// Activations are quantized per row, symmetric, to int8 with zero point 0
    /// (scale = max|row| / 127, x · (1/scale), round half to even, Cast; no Clip: |x| ≤ max|row|
    /// keeps the rounded value within ±127), and MatMulInteger gets no zero points: in
    /// tract the zero-point compensation then folds away (no per-call weight sums) and the
    /// constant int8 weight is packed once at load. (onnxruntime's DynamicQuantizeLinear gives
    /// uint8 with a dynamic zero point, which makes tract sum the weights at every call.)
    pub fn matmul_int8(&mut self, x: &str, wq: &str, ws: &str) -> String {
        let (xq, xs) = match self.quantized.get(x) {
            Some(t) => t.clone(),
            None => {
                if self.consts.is_empty() {
                    let axes = self.g.init_i64("q.axes_last", &[1], &[-1]);
                    let tiny = self.g.init_f32("q.tiny", &[], &[1e-12]);
                    let inv127 = self.g.init_f32("q.inv127", &[], &[1.0 / 127.0]);
                    let magic = self.g.init_f32("q.round_magic", &[], &[12_582_912.0]);
                    self.consts = vec![axes, tiny, inv127, magic];
                }
                let c = self.consts.clone();
                let a = self.g.node("Abs", &[x], vec![]);
                let m = self.g.node("ReduceMax", &[&a, &c[0]], vec![("keepdims", Attr::Int(1))]);
                let m = self.g.node("Max", &[&m, &c[1]], vec![]);
                let scale = self.g.node("Mul", &[&m, &c[2]], vec![]);
                // One reciprocal per row, then a multiply over the row: cheaper than a divide.
                let inv = self.g.node("Reciprocal", &[&scale], vec![]);
                let r = self.g.node("Mul", &[x, &inv], vec![]);
                // Round half to even as (r + 1.5·2²³) − 1.5·2²³ (exact for |r| < 2²²; here ≤ 127):
                // two vectorised scalar ops that tract chains with the multiply, where its
                // `Round` is a scalar loop (measured over the full-size encoder, loaded machine:
                // 62 ms for Round, 11 ms for the whole Mul+Add+Sub chain).
                let r = self.g.node("Add", &[&r, &c[3]], vec![]);
                let r = self.g.node("Sub", &[&r, &c[3]], vec![]);
                let q = self.g.node("Cast", &[&r], vec![("to", Attr::Int(DataType::Int8 as i64))]);
                self.quantized.insert(x.to_string(), (q.clone(), scale.clone()));
                (q, scale)
            }
        };
        let acc = self.g.node("MatMulInteger", &[&xq, wq], vec![]);
        let accf = self.g.node("Cast", &[&acc], vec![("to", Attr::Int(DataType::Float as i64))]);
        let y = self.g.node("Mul", &[&accf, &xs], vec![]);
        self.g.node("Mul", &[&y, ws], vec![])
    }

    /// A linear layer stored `[out, in]` (nn.Linear), scaled by `mult`.
    pub fn nn_linear(&mut self, x: &str, prefix: &str, mult: f32) -> Result<String> {
        let (dims, w) = self.get(&format!("{prefix}.weight"))?;
        let (_, b) = self.get(&format!("{prefix}.bias"))?;
        let (dout, din) = (dims[0], dims[1]);
        let mut wt = transpose(w, dout, din);
        let mut b = b.clone();
        if mult != 1.0 {
            wt.iter_mut().for_each(|v| *v *= mult);
            b.iter_mut().for_each(|v| *v *= mult);
        }
        Ok(self.linear(x, prefix, &wt, din, dout, &b))
    }

    /// GPT-2's Conv1D (stored `[in, out]`), columns `cols` of it, scaled by `mult`.
    pub fn conv1d_cols(&mut self, x: &str, prefix: &str, cols: std::ops::Range<usize>, mult: f32, tag: &str) -> Result<String> {
        let (dims, w) = self.get(&format!("{prefix}.weight"))?;
        let (_, b) = self.get(&format!("{prefix}.bias"))?;
        let (din, dout) = (dims[0], dims[1]);
        let n = cols.len();
        let mut ws = Vec::with_capacity(din * n);
        for r in 0..din {
            ws.extend(w[r * dout + cols.start..r * dout + cols.end].iter().map(|v| v * mult));
        }
        let bs: Vec<f32> = b[cols].iter().map(|v| v * mult).collect();
        Ok(self.linear(x, &format!("{prefix}{tag}"), &ws, din, n, &bs))
    }

    pub fn conv1d(&mut self, x: &str, prefix: &str) -> Result<String> {
        let dout = self.get(&format!("{prefix}.weight"))?.0[1];
        self.conv1d_cols(x, prefix, 0..dout, 1.0, "")
    }

    pub fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64) -> Result<String> {
        let w = self.f32_init(&format!("{prefix}.weight"))?;
        let b = self.f32_init(&format!("{prefix}.bias"))?;
        Ok(self.g.node("LayerNormalization", &[x, &w, &b], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))]))
    }

    /// GPT-2 block's MLP with its pre-norm and residual: `x + c_proj(act(c_fc(ln_2(x))))`.
    pub fn gpt2_mlp(&mut self, x: &str, layer: &str, eps: f64, act: Activation) -> Result<String> {
        let h = self.layer_norm(x, &format!("{layer}.ln_2"), eps)?;
        let m = self.conv1d(&h, &format!("{layer}.mlp.c_fc"))?;
        let m = self.activation(&m, act);
        let m = self.conv1d(&m, &format!("{layer}.mlp.c_proj"))?;
        Ok(self.g.node("Add", &[x, &m], vec![]))
    }

    /// `x + c_proj(ctx)`: an attention block's output projection (GPT-2 Conv1D) and residual.
    pub fn residual_proj(&mut self, x: &str, ctx: &str, c_proj: &str) -> Result<String> {
        let o = self.conv1d(ctx, c_proj)?;
        Ok(self.g.node("Add", &[x, &o], vec![]))
    }

    /// The cross-attention query of GPT-2 layer `layer`: `q_attn(ln_cross_attn(x))`, with the
    /// attention scale folded into its weights.
    pub fn cross_query(&mut self, x: &str, layer: &str, eps: f64, scale: f32) -> Result<String> {
        let h = self.layer_norm(x, &format!("{layer}.ln_cross_attn"), eps)?;
        let q_attn = format!("{layer}.crossattention.q_attn");
        let dq = self.get(&format!("{q_attn}.weight"))?.0[1];
        self.conv1d_cols(&h, &q_attn, 0..dq, scale, "")
    }

    /// GPT-2's final layer norm and the LM head tied to the token embedding (`lm_w`
    /// `[vocab, d]`, stored once; int8 with its per-row scales `lm_scale`).
    pub fn lm_head(&mut self, x: &str, eps: f64, lm_w: &str, lm_scale: Option<&str>) -> Result<String> {
        let h = self.layer_norm(x, "decoder.transformer.ln_f", eps)?;
        let wt = self.transpose(lm_w, &[1, 0]);
        Ok(match lm_scale {
            None => self.g.node("MatMul", &[&h, &wt], vec![]),
            Some(ws) => self.matmul_int8(&h, &wt, ws),
        })
    }

    pub fn activation(&mut self, x: &str, act: Activation) -> String {
        match act {
            Activation::GeluErf => self.g.node("Gelu", &[x], vec![]),
            Activation::GeluTanh => self.g.node("Gelu", &[x], vec![("approximate", Attr::Str("tanh"))]),
            Activation::Relu => self.g.node("Relu", &[x], vec![]),
        }
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.g.shape_const(shape);
        self.g.node("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.g.node("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    /// softmax(q · kᵀ) · v with `kt` already transposed (`[.., hd, len]`); scale folded into q.
    pub fn attend(&mut self, q: &str, kt: &str, v: &str) -> String {
        self.attend_masked(q, kt, v, None)
    }

    /// [`Self::attend`] with an additive `mask` broadcast onto the scores.
    pub fn attend_masked(&mut self, q: &str, kt: &str, v: &str, mask: Option<&str>) -> String {
        let mut s = self.g.node("MatMul", &[q, kt], vec![]);
        if let Some(m) = mask {
            s = self.g.node("Add", &[&s, m], vec![]);
        }
        let p = self.g.node("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
        self.g.node("MatMul", &[&p, v], vec![])
    }

    /// The cross-attention mask of a model with `decoder.cross_attention_causal` (the original
    /// ViT-GPT2), `None` otherwise: additive `[N, keys]` (0 / −∞) from the query positions
    /// `positions` `[N]` (int64), hiding encoder position j from a query at position p when
    /// j > p (the original's cross-attention is GPT-2's attention with its causal mask).
    pub fn cross_mask(&mut self, cfg: &ModelConfig, positions: &str) -> Option<String> {
        if !cfg.decoder.cross_attention_causal {
            return None;
        }
        let s = cfg.encoder.seq_len();
        let keys = self.g.init_i64("cross_mask.keys", &[s], &(0..s as i64).collect::<Vec<_>>());
        let axis = self.g.shape_const(&[1]);
        let col = self.g.node("Unsqueeze", &[positions, &axis], vec![]);
        let later = self.g.node("Greater", &[&keys, &col], vec![]);
        let neg = self.g.init_f32("cross_mask.neg_inf", &[], &[f32::NEG_INFINITY]);
        let zero = self.g.init_f32("cross_mask.zero", &[], &[0.0]);
        Some(self.g.node("Where", &[&later, &neg, &zero], vec![]))
    }
}

fn act(name: &str, what: &str) -> Result<Activation> {
    Activation::from_name(name).map_err(|e| Error::setting(what, e))
}

/// The decoder's activation by its transformers name.
pub fn gelu_of(name: &str) -> Result<Activation> {
    act(name, "decoder.activation_function")
}

/// GPT-2's attention scale for layer `i` (as the candle model).
pub fn gpt2_scale(cfg: &ModelConfig, i: usize) -> f32 {
    let d = &cfg.decoder;
    let mut s = 1.0f64;
    if d.scale_attn_weights {
        s /= (d.head_dim() as f64).sqrt();
    }
    if d.scale_attn_by_inverse_layer_idx {
        s /= (i + 1) as f64;
    }
    s as f32
}

/// The ViT encoder body: `pixel_values` → last hidden state `[1,S,D]`.
pub fn vit(net: &mut Net, cfg: &ModelConfig, pixel_values: &str) -> Result<String> {
    let e = &cfg.encoder;
    let (c, side, p, d) = (e.num_channels, e.image_size, e.patch_size, e.hidden_size);
    let g = side / p;
    let (s, heads) = (e.seq_len(), e.num_attention_heads);
    let hd = d / heads;
    // Patch embedding (kernel == stride conv) as a matmul over flattened patches.
    let x6 = net.reshape(pixel_values, &[1, c as i64, g as i64, p as i64, g as i64, p as i64]);
    let xt = net.transpose(&x6, &[0, 2, 4, 1, 3, 5]);
    let patches = net.reshape(&xt, &[1, (g * g) as i64, (c * p * p) as i64]);
    let (_, pw) = net.get("encoder.embeddings.patch_embeddings.projection.weight")?;
    let (_, pb) = net.get("encoder.embeddings.patch_embeddings.projection.bias")?;
    let pwt = transpose(pw, d, c * p * p);
    let emb = net.linear(&patches, "encoder.embeddings.patch_embeddings.projection", &pwt, c * p * p, d, pb);
    let cls = net.f32_init("encoder.embeddings.cls_token")?;
    let cat = net.g.node("Concat", &[&cls, &emb], vec![("axis", Attr::Int(1))]);
    let pos = net.f32_init("encoder.embeddings.position_embeddings")?;
    let mut x = net.g.node("Add", &[&cat, &pos], vec![]);
    let activation = act(&e.hidden_act, "encoder.hidden_act")?;
    let scale = 1.0 / (hd as f32).sqrt();
    for i in 0..e.num_hidden_layers {
        let l = format!("encoder.encoder.layer.{i}");
        let h = net.layer_norm(&x, &format!("{l}.layernorm_before"), e.layer_norm_eps)?;
        let qkv = vit_qkv(net, &h, &format!("{l}.attention.attention"), d, scale)?;
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        let split = [1, s as i64, heads as i64, hd as i64];
        let q = net.reshape(q, &split);
        let q = net.transpose(&q, &[0, 2, 1, 3]);
        let k = net.reshape(k, &split);
        let kt = net.transpose(&k, &[0, 2, 3, 1]);
        let v = net.reshape(v, &split);
        let v = net.transpose(&v, &[0, 2, 1, 3]);
        let ctx = net.attend(&q, &kt, &v);
        let ctx = net.transpose(&ctx, &[0, 2, 1, 3]);
        let ctx = net.reshape(&ctx, &[1, s as i64, d as i64]);
        let o = net.nn_linear(&ctx, &format!("{l}.attention.output.dense"), 1.0)?;
        x = net.g.node("Add", &[&x, &o], vec![]);
        let h = net.layer_norm(&x, &format!("{l}.layernorm_after"), e.layer_norm_eps)?;
        let m = net.nn_linear(&h, &format!("{l}.intermediate.dense"), 1.0)?;
        let m = net.activation(&m, activation);
        let m = net.nn_linear(&m, &format!("{l}.output.dense"), 1.0)?;
        x = net.g.node("Add", &[&x, &m], vec![]);
    }
    net.layer_norm(&x, "encoder.layernorm", e.layer_norm_eps)
}

/// ViT's query, key and value projections (`nn.Linear`, stored `[out, in]`) as one matmul; the
/// attention scale is folded into the query columns.
fn vit_qkv(net: &mut Net, h: &str, prefix: &str, d: usize, scale: f32) -> Result<Vec<String>> {
    let mut w = vec![0f32; d * 3 * d];
    let mut b = Vec::with_capacity(3 * d);
    for (j, (part, mult)) in [("query", scale), ("key", 1.0), ("value", 1.0)].into_iter().enumerate() {
        let (dims, wj) = net.get(&format!("{prefix}.{part}.weight"))?;
        let (_, bj) = net.get(&format!("{prefix}.{part}.bias"))?;
        if dims[..] != [d, d] {
            return Err(Error::setting("export", format!("{prefix}.{part}.weight is {dims:?}, expected [{d}, {d}]")));
        }
        for o in 0..d {
            for i in 0..d {
                w[i * 3 * d + j * d + o] = wj[o * d + i] * mult;
            }
        }
        b.extend(bj.iter().map(|v| v * mult));
    }
    Ok(net.linear_split(h, &format!("{prefix}.qkv"), &w, d, 3 * d, &b, 3))
}

/// The encoder output as the decoder sees it (after `enc_to_dec_proj` when present).
pub fn project(net: &mut Net, last: &str) -> Result<String> {
    if net.w.contains("enc_to_dec_proj.weight") {
        net.nn_linear(last, "enc_to_dec_proj", 1.0)
    } else {
        Ok(last.to_string())
    }
}

/// `encoder_fast.onnx`.
pub fn encoder_graph(cfg: &ModelConfig, w: &Weights, form: WeightForm) -> Result<ModelProto> {
    let mut net = Net::new("vitgpt2_encoder_fast", form, w);
    let e = &cfg.encoder;
    let side = e.image_size;
    let pv = net.g.input(tensor::PIXEL_VALUES, DataType::Float, &[1.into(), e.num_channels.into(), side.into(), side.into()]);
    let last = vit(&mut net, cfg, &pv)?;
    let s = e.seq_len();
    net.g.output(&last, tensor::LAST_HIDDEN_STATE, DataType::Float, &[1.into(), s.into(), e.hidden_size.into()]);
    let enc = project(&mut net, &last)?;
    let dd = &cfg.decoder;
    let (d, heads, hd) = (dd.n_embd, dd.n_head, dd.head_dim());
    for i in 0..dd.n_layer {
        let pre = format!("decoder.transformer.h.{i}.crossattention.c_attn");
        for (j, kv) in tensor::KV.into_iter().enumerate() {
            let y = net.conv1d_cols(&enc, &pre, j * d..(j + 1) * d, 1.0, &format!(".{kv}"))?;
            let y = net.reshape(&y, &[1, s as i64, heads as i64, hd as i64]);
            let y = net.transpose(&y, &[0, 2, 1, 3]);
            net.g.output(&y, &tensor::cross(i, kv), DataType::Float, &[1.into(), heads.into(), s.into(), hd.into()]);
        }
    }
    Ok(net.g.finish("ViT encoder with every decoder layer's cross-attention keys/values (vitgpt2 fast layout)", &meta(form)))
}

/// The graph metadata that says a decoder's cross-attention is causal over the image tokens
/// (when `cfg` asks for it; see [`contract::metadata`]).
pub fn cross_meta(cfg: &ModelConfig) -> Vec<(&'static str, String)> {
    if cfg.decoder.cross_attention_causal {
        vec![(contract::metadata::CROSS_ATTENTION, contract::metadata::CAUSAL_OVER_IMAGE_TOKENS.into())]
    } else {
        Vec::new()
    }
}

fn meta(form: WeightForm) -> Vec<(&'static str, String)> {
    vec![
        ("vitgpt2.layout", "fast".into()),
        ("vitgpt2.weights", match form {
            WeightForm::Fp32 => "fp32".into(),
            WeightForm::Int8 { reduce_range: false } => "int8 per-output-channel symmetric".into(),
            WeightForm::Int8 { reduce_range: true } => "int8 per-output-channel symmetric, 7-bit (reduce_range)".into(),
        }),
    ]
}

/// `decoder_step.onnx`.
pub fn decoder_step_graph(cfg: &ModelConfig, w: &Weights, form: WeightForm) -> Result<ModelProto> {
    let mut net = Net::new("vitgpt2_decoder_step", form, w);
    let dd = &cfg.decoder;
    let (d, heads, hd, vocab) = (dd.n_embd, dd.n_head, dd.head_dim(), dd.vocab_size);
    let s = cfg.encoder.seq_len();
    let b = Dim::Sym("B");
    let ids = net.g.input(tensor::INPUT_IDS, DataType::Int64, &[b.clone(), 1.into()]);
    let pos = net.g.input(tensor::POSITION_IDS, DataType::Int64, &[b.clone(), 1.into()]);
    let mut past = Vec::new();
    for i in 0..dd.n_layer {
        for kv in tensor::KV {
            past.push(net.g.input(&tensor::past(i, kv), DataType::Float, &[b.clone(), heads.into(), Dim::Sym("P"), hd.into()]));
        }
    }
    let mut cross = Vec::new();
    for i in 0..dd.n_layer {
        for kv in tensor::KV {
            cross.push(net.g.input(&tensor::cross(i, kv), DataType::Float, &[1.into(), heads.into(), s.into(), hd.into()]));
        }
    }
    // Token embedding: one stored tensor, also the LM head.
    let wte_name = "decoder.transformer.wte.weight";
    // The residual stream is [B, D] (not [B, 1, D]): every linear layer is then one matmul with
    // the hypotheses as rows, reading each weight once per step whatever the beam width.
    let ids = net.reshape(&ids, &[-1]);
    let pos = net.reshape(&pos, &[-1]);
    // [B, S], added to every layer's [heads, B, S] cross scores.
    let cross_mask = net.cross_mask(cfg, &pos);
    let (tok, lm_w, lm_scale) = token_embedding(&mut net, wte_name, &ids, vocab, d)?;
    let wpe = net.f32_init("decoder.transformer.wpe.weight")?;
    let pe = net.g.node("Gather", &[&wpe, &pos], vec![("axis", Attr::Int(0))]);
    let mut x = net.g.node("Add", &[&tok, &pe], vec![]);
    let activation = act(&dd.activation_function, "decoder.activation_function")?;
    let eps = dd.layer_norm_epsilon;
    let split = [0, heads as i64, 1, hd as i64];
    let merge = [0, d as i64];
    let out_dims = |p: &'static str| vec![Dim::Sym("B"), heads.into(), Dim::Sym(p), hd.into()];
    for i in 0..dd.n_layer {
        let l = format!("decoder.transformer.h.{i}");
        let scale = gpt2_scale(cfg, i);
        // Causal self-attention over past + this token (a single token sees every position).
        let h = net.layer_norm(&x, &format!("{l}.ln_1"), eps)?;
        let qkv = gpt2_qkv(&mut net, &h, &format!("{l}.attn.c_attn"), d, scale)?;
        let q = net.reshape(&qkv[0], &split);
        let k = net.reshape(&qkv[1], &split);
        let v = net.reshape(&qkv[2], &split);
        let [pk, pv] = tensor::KV.map(|kv| tensor::present(i, kv));
        net.g.node_to("Concat", &[&past[2 * i], &k], &pk, vec![("axis", Attr::Int(2))]);
        net.g.node_to("Concat", &[&past[2 * i + 1], &v], &pv, vec![("axis", Attr::Int(2))]);
        net.g.output(&pk, &pk, DataType::Float, &out_dims("P_plus_1"));
        net.g.output(&pv, &pv, DataType::Float, &out_dims("P_plus_1"));
        let kt = net.transpose(&pk, &[0, 1, 3, 2]);
        let ctx = net.attend(&q, &kt, &pv);
        let ctx = net.reshape(&ctx, &merge);
        x = net.residual_proj(&x, &ctx, &format!("{l}.attn.c_proj"))?;
        // Cross-attention on the cached encoder keys/values.
        let q = net.cross_query(&x, &l, eps, scale)?;
        // The cached keys/values are one image's: put the hypotheses in the rows of one
        // [heads, B, hd] · [heads, hd, S] product instead of broadcasting the cache over B.
        let q = net.reshape(&q, &[0, heads as i64, hd as i64]);
        let q = net.transpose(&q, &[1, 0, 2]);
        let per_head = [heads as i64, s as i64, hd as i64];
        let k = net.reshape(&cross[2 * i], &per_head);
        let kt = net.transpose(&k, &[0, 2, 1]);
        let v = net.reshape(&cross[2 * i + 1], &per_head);
        let ctx = net.attend_masked(&q, &kt, &v, cross_mask.as_deref());
        let ctx = net.transpose(&ctx, &[1, 0, 2]);
        let ctx = net.reshape(&ctx, &merge);
        x = net.residual_proj(&x, &ctx, &format!("{l}.crossattention.c_proj"))?;
        x = net.gpt2_mlp(&x, &l, eps, activation)?;
    }
    let logits = net.lm_head(&x, eps, &lm_w, lm_scale.as_deref())?;
    net.g.output(&logits, tensor::LOGITS, DataType::Float, &[Dim::Sym("B"), vocab.into()]);
    let meta = [meta(form), cross_meta(cfg)].concat();
    Ok(net.g.finish("GPT-2 decoder step with self-attention cache and cached cross keys/values (vitgpt2 fast layout)", &meta))
}

/// GPT-2's `c_attn` (Conv1D `[in, 3·out]`) as one matmul split into query, key and value; the
/// attention scale is folded into the query columns.
pub fn gpt2_qkv(net: &mut Net, h: &str, prefix: &str, d: usize, scale: f32) -> Result<Vec<String>> {
    let (dims, w) = net.get(&format!("{prefix}.weight"))?;
    let (_, b) = net.get(&format!("{prefix}.bias"))?;
    if dims[..] != [d, 3 * d] {
        return Err(Error::setting("export", format!("{prefix}.weight is {dims:?}, expected [{d}, {}]", 3 * d)));
    }
    let mut w = w.clone();
    let mut b = b.clone();
    for r in 0..d {
        w[r * 3 * d..r * 3 * d + d].iter_mut().for_each(|v| *v *= scale);
    }
    b[..d].iter_mut().for_each(|v| *v *= scale);
    Ok(net.linear_split(h, prefix, &w, d, 3 * d, &b, 3))
}

/// Token embedding rows for `ids` and the stored tensor the LM head reuses (transposed):
/// `(embeddings, lm_weight, lm_scales)`; int8 stores the table once, per row, symmetric (a
/// row's scale is also the LM head's scale for that token).
pub fn token_embedding(net: &mut Net, wte_name: &str, ids: &str, vocab: usize, d: usize) -> Result<(String, String, Option<String>)> {
    let (wte_dims, wte) = net.get(wte_name)?;
    if wte_dims[0] != vocab || wte_dims[1] != d {
        return Err(Error::setting("export", format!("wte is {wte_dims:?}, config says [{vocab}, {d}]")));
    }
    Ok(match net.form {
        WeightForm::Fp32 => {
            let wte = net.g.init_f32(wte_name, &[vocab, d], wte);
            let tok = net.g.node("Gather", &[&wte, ids], vec![("axis", Attr::Int(0))]);
            (tok, wte, None)
        }
        WeightForm::Int8 { .. } => {
            let (q, sc) = quantize_rows(wte, vocab, d, net.form.weight_max());
            let wq = net.g.init_i8(&format!("{wte_name}_int8"), &[vocab, d], &q);
            let ws = net.g.init_f32(&format!("{wte_name}_scale"), &[vocab], &sc);
            let rows = net.g.node("Gather", &[&wq, ids], vec![("axis", Attr::Int(0))]);
            let rows = net.g.node("Cast", &[&rows], vec![("to", Attr::Int(DataType::Float as i64))]);
            let rs = net.g.node("Gather", &[&ws, ids], vec![("axis", Attr::Int(0))]);
            let axes = net.g.shape_const(&[-1]);
            let rs = net.g.node("Unsqueeze", &[&rs, &axes], vec![]);
            let tok = net.g.node("Mul", &[&rows, &rs], vec![]);
            (tok, wq, Some(ws))
        }
    })
}
