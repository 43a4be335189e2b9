//! Optimum's `image-to-text-with-past` layout, for onnxruntime and transformers.js users:
//! `encoder_model` (pixel_values → last_hidden_state), `decoder_model` (input_ids [B,T],
//! encoder_hidden_states → logits [B,T,V] and present.{i}.key/value) and
//! `decoder_with_past_model` (the same plus past_key_values.{i}.key/value). As in Optimum's
//! export, the decoders apply `enc_to_dec_proj` and recompute the cross-attention keys/values
//! from the encoder output at every call. Same ops and weight forms as the fast layout.

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::ModelProto;

use super::fast::{cross_meta, gelu_of, gpt2_scale, project, vit, Net, WeightForm};
use super::onnx::{Attr, Dim};
use super::Weights;
use crate::bundle::contract::{self, graph, tensor};
use crate::config::ModelConfig;
use crate::error::Result;

/// File names of the Optimum layout, under `onnx/` as transformers.js looks for them: encoder,
/// merged decoder (what transformers.js loads), then the split pair older onnxruntime users run.
/// int8 carries transformers.js's q8 suffix, `_quantized`.
pub fn optimum_files(form: WeightForm) -> [String; 4] {
    let suffix = match form {
        WeightForm::Fp32 => graph::FP32,
        WeightForm::Int8 { .. } => graph::OPTIMUM_INT8,
    };
    [graph::ENCODER_MODEL, graph::DECODER_MERGED, graph::DECODER_MODEL, graph::DECODER_WITH_PAST]
        .map(|stem| format!("{}/{}", contract::ONNX_DIR, graph::file(stem, suffix)))
}

pub fn encoder_graph(cfg: &ModelConfig, w: &Weights, form: WeightForm) -> Result<ModelProto> {
    let mut net = Net::new("vitgpt2_encoder_model", form, w);
    let e = &cfg.encoder;
    let side = e.image_size;
    let pv = net.g.input(tensor::PIXEL_VALUES, DataType::Float, &[1.into(), e.num_channels.into(), side.into(), side.into()]);
    let last = vit(&mut net, cfg, &pv)?;
    net.g.output(&last, tensor::LAST_HIDDEN_STATE, DataType::Float, &[1.into(), e.seq_len().into(), e.hidden_size.into()]);
    Ok(net.g.finish("ViT encoder (Optimum image-to-text-with-past layout)", &[("vitgpt2.layout", "optimum".into())]))
}

/// Which of Optimum's decoder graphs to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderKind {
    /// `decoder_model`: `input_ids [B, T]`, no past.
    First,
    /// `decoder_with_past_model`: one new token after a past of any length.
    WithPast,
    /// `decoder_model_merged` as transformers.js loads it: `input_ids [B, T]` after a past of any
    /// length, zero included (the first step gets an empty past). No `If` and no
    /// `use_cache_branch`: one graph for every step, which transformers.js and onnxruntime accept.
    Merged,
}

/// One of Optimum's decoder graphs.
pub fn decoder_graph(cfg: &ModelConfig, w: &Weights, form: WeightForm, kind: DecoderKind) -> Result<ModelProto> {
    let with_past = kind != DecoderKind::First;
    let name = match kind {
        DecoderKind::First => "vitgpt2_decoder_model",
        DecoderKind::WithPast => "vitgpt2_decoder_with_past_model",
        DecoderKind::Merged => "vitgpt2_decoder_model_merged",
    };
    let mut net = Net::new(name, form, w);
    let dd = &cfg.decoder;
    let (d, heads, hd, vocab) = (dd.n_embd, dd.n_head, dd.head_dim(), dd.vocab_size);
    let (s, de) = (cfg.encoder.seq_len(), cfg.encoder.hidden_size);
    let b = Dim::Sym("batch_size");
    let t_dim = if kind == DecoderKind::WithPast { Dim::Fixed(1) } else { Dim::Sym("decoder_sequence_length") };
    let ids = net.g.input(tensor::INPUT_IDS, DataType::Int64, &[b.clone(), t_dim.clone()]);
    let enc = net.g.input(tensor::ENCODER_HIDDEN_STATES, DataType::Float, &[b.clone(), s.into(), de.into()]);
    let mut past = Vec::new();
    if with_past {
        for i in 0..dd.n_layer {
            for kv in tensor::KV {
                past.push(net.g.input(
                    &tensor::past_key_values(i, kv),
                    DataType::Float,
                    &[b.clone(), heads.into(), Dim::Sym("past_sequence_length"), hd.into()],
                ));
            }
        }
    }
    let e = project(&mut net, &enc)?;
    // Positions past .. past + T, and the causal mask [T, past + T].
    let i64c = |net: &mut Net, name: &str, v: i64| net.g.init_i64(name, &[], &[v]);
    let zero = i64c(&mut net, "c.zero", 0);
    let one = i64c(&mut net, "c.one", 1);
    let ids_shape = net.g.node("Shape", &[&ids], vec![]);
    let t = net.g.node("Gather", &[&ids_shape, &one], vec![("axis", Attr::Int(0))]);
    let p = if with_past {
        let two = i64c(&mut net, "c.two", 2);
        let ps = net.g.node("Shape", &[&past[0]], vec![]);
        net.g.node("Gather", &[&ps, &two], vec![("axis", Attr::Int(0))])
    } else {
        zero.clone()
    };
    let end = net.g.node("Add", &[&p, &t], vec![]);
    let pos = net.g.node("Range", &[&p, &end, &one], vec![]);
    let keys = net.g.node("Range", &[&zero, &end, &one], vec![]);
    let ax1 = net.g.shape_const(&[1]);
    let ax0 = net.g.shape_const(&[0]);
    let qcol = net.g.node("Unsqueeze", &[&pos, &ax1], vec![]);
    let krow = net.g.node("Unsqueeze", &[&keys, &ax0], vec![]);
    let future = net.g.node("Greater", &[&krow, &qcol], vec![]);
    let neg = net.g.init_f32("c.neg_inf", &[], &[f32::NEG_INFINITY]);
    let fzero = net.g.init_f32("c.fzero", &[], &[0.0]);
    let mask = net.g.node("Where", &[&future, &neg, &fzero], vec![]);
    // [T, S], added to every layer's [B, heads, T, S] cross scores.
    let cross_mask = net.cross_mask(cfg, &pos);

    let wte_name = "decoder.transformer.wte.weight";
    let (tok, lm_w, lm_scale) = super::fast::token_embedding(&mut net, wte_name, &ids, vocab, d)?;
    let wpe = net.f32_init("decoder.transformer.wpe.weight")?;
    let pe = net.g.node("Gather", &[&wpe, &pos], vec![("axis", Attr::Int(0))]);
    let mut x = net.g.node("Add", &[&tok, &pe], vec![]);
    let activation = gelu_of(&dd.activation_function)?;
    let eps = dd.layer_norm_epsilon;
    let split = [0, 0, heads as i64, hd as i64];
    let merge = [0, 0, d as i64];
    let present_len = match kind {
        DecoderKind::First => "decoder_sequence_length",
        DecoderKind::WithPast => "past_sequence_length + 1",
        DecoderKind::Merged => "past_sequence_length + decoder_sequence_length",
    };
    for i in 0..dd.n_layer {
        let l = format!("decoder.transformer.h.{i}");
        let scale = gpt2_scale(cfg, i);
        let h = net.layer_norm(&x, &format!("{l}.ln_1"), eps)?;
        let mut qkv = Vec::new();
        for y in super::fast::gpt2_qkv(&mut net, &h, &format!("{l}.attn.c_attn"), d, scale)? {
            let y = net.reshape(&y, &split);
            qkv.push(net.transpose(&y, &[0, 2, 1, 3]));
        }
        let [pk, pv] = tensor::KV.map(|kv| tensor::present(i, kv));
        if with_past {
            net.g.node_to("Concat", &[&past[2 * i], &qkv[1]], &pk, vec![("axis", Attr::Int(2))]);
            net.g.node_to("Concat", &[&past[2 * i + 1], &qkv[2]], &pv, vec![("axis", Attr::Int(2))]);
        } else {
            net.g.node_to("Identity", &[&qkv[1]], &pk, vec![]);
            net.g.node_to("Identity", &[&qkv[2]], &pv, vec![]);
        }
        for n in [&pk, &pv] {
            net.g.output(n, n, DataType::Float, &[Dim::Sym("batch_size"), heads.into(), Dim::Sym(present_len), hd.into()]);
        }
        let kt = net.transpose(&pk, &[0, 1, 3, 2]);
        let sc = net.g.node("MatMul", &[&qkv[0], &kt], vec![]);
        let sc = net.g.node("Add", &[&sc, &mask], vec![]);
        let pr = net.g.node("Softmax", &[&sc], vec![("axis", Attr::Int(-1))]);
        let ctx = net.g.node("MatMul", &[&pr, &pv], vec![]);
        let ctx = net.transpose(&ctx, &[0, 2, 1, 3]);
        let ctx = net.reshape(&ctx, &merge);
        x = net.residual_proj(&x, &ctx, &format!("{l}.attn.c_proj"))?;
        // Cross-attention, keys/values recomputed from the encoder output.
        let q = net.cross_query(&x, &l, eps, scale)?;
        let q = net.reshape(&q, &split);
        let q = net.transpose(&q, &[0, 2, 1, 3]);
        let ca = format!("{l}.crossattention.c_attn");
        let k = net.conv1d_cols(&e, &ca, 0..d, 1.0, ".key")?;
        let k = net.reshape(&k, &split);
        let kt = net.transpose(&k, &[0, 2, 3, 1]);
        let v = net.conv1d_cols(&e, &ca, d..2 * d, 1.0, ".value")?;
        let v = net.reshape(&v, &split);
        let v = net.transpose(&v, &[0, 2, 1, 3]);
        let ctx = net.attend_masked(&q, &kt, &v, cross_mask.as_deref());
        let ctx = net.transpose(&ctx, &[0, 2, 1, 3]);
        let ctx = net.reshape(&ctx, &merge);
        x = net.residual_proj(&x, &ctx, &format!("{l}.crossattention.c_proj"))?;
        x = net.gpt2_mlp(&x, &l, eps, activation)?;
    }
    let logits = net.lm_head(&x, eps, &lm_w, lm_scale.as_deref())?;
    net.g.output(&logits, tensor::LOGITS, DataType::Float, &[Dim::Sym("batch_size"), t_dim, vocab.into()]);
    let meta = [vec![("vitgpt2.layout", "optimum".into())], cross_meta(cfg)].concat();
    Ok(net.g.finish("GPT-2 decoder with cross-attention (Optimum image-to-text-with-past layout)", &meta))
}
