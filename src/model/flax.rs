//! Flax checkpoints (`flax_model.msgpack`) in the PyTorch names and layouts of
//! `VisionEncoderDecoderModel`, for the two Flax trees a ViT-GPT2 comes in:
//!
//! - [`FlaxTree::Original`]: the original ViT-GPT2 project (flax-community/vit-gpt2, code in
//!   github.com/acul3/vit-gpt2 `vit_gpt2/`): everything under `model/{encoder,decoder}`; its
//!   GPT-2 blocks have `ln_3` and an `encoder_attn` whose query comes from a full-size `c_attn`
//!   (3E rows, of which the original uses the first E) and whose keys/values come from
//!   `c_attn_for_k_v` (2E rows: keys, then values).
//! - [`FlaxTree::Transformers`]: transformers' `FlaxVisionEncoderDecoderModel`
//!   (e.g. ydshieh/vit-gpt2-coco-en): `{encoder,decoder}`, transformers' module names.
//!
//! The file is `flax.serialization.to_bytes(params)`: one msgpack map, nested by module name
//! (layer indices are string keys), every leaf a msgpack extension of type 1 whose payload is
//! msgpack `[shape, dtype name, raw C-order little-endian bytes]` (flax/serialization.py,
//! `_ndarray_to_bytes`). Layouts (transformers' `modeling_flax_pytorch_utils`, in reverse):
//! Dense kernels are `[in, out]` (PyTorch `[out, in]`: transposed), GPT-2 "Conv1D" kernels are
//! stored `[out, in]` (PyTorch Conv1D `[in, out]`: transposed too), the patch convolution's kernel
//! is HWIO (PyTorch OIHW: axes 3, 2, 0, 1), layer norms' `scale` is `weight`, embeddings'
//! `embedding` is `weight`.

use std::path::Path;

use candle_core::{Device, Tensor};
use rmpv::ValueRef;

use crate::error::{Error, Result};

/// Which Flax parameter tree a `flax_model.msgpack` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlaxTree {
    /// The original ViT-GPT2 project's `FlaxViTGPT2LMForConditionalGeneration`.
    Original,
    /// transformers' `FlaxVisionEncoderDecoderModel`.
    Transformers,
}

/// One stored array: its path in the tree (`a/b/c`), shape and values widened to f32.
#[derive(Debug, Clone)]
pub struct FlaxLeaf {
    pub path: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A Flax checkpoint in the `VisionEncoderDecoderModel`'s names and layouts.
pub struct FlaxWeights {
    /// Tensors by PyTorch name, with PyTorch layouts (the LM head excluded).
    pub tensors: Vec<(String, Tensor)>,
    /// `decoder/lm_head/kernel` when the file has one (must equal the token embedding).
    pub lm_head: Option<Tensor>,
    /// What was left out on purpose, one line each (the unused thirds of the original's
    /// `encoder_attn/c_attn`, parameters it declares and never calls).
    pub dropped: Vec<String>,
}

/// Reads every leaf of a `flax_model.msgpack`. Errors (one line naming the file and, where there
/// is one, the tensor): not msgpack, trailing bytes, a leaf that is not a type-1 extension, a
/// dtype other than float32/float16/bfloat16, a byte length ≠ shape × dtype size.
pub fn read_leaves(path: &Path) -> Result<Vec<FlaxLeaf>> {
    let bytes = std::fs::read(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    let mut rd = &bytes[..];
    let root = rmpv::decode::read_value_ref(&mut rd)
        .map_err(|e| Error::checkpoint(path, format!("not a readable msgpack file ({e}): a Flax checkpoint is flax.serialization.to_bytes(params)")))?;
    if !rd.is_empty() {
        return Err(Error::checkpoint(path, format!("{} bytes after the msgpack map: the file is damaged or not a Flax checkpoint", rd.len())));
    }
    let mut leaves = Vec::new();
    walk(&root, "", &mut leaves).map_err(|m| Error::checkpoint(path, m))?;
    if leaves.is_empty() {
        return Err(Error::checkpoint(path, "no tensors in the file"));
    }
    Ok(leaves)
}

/// Collects the arrays under `v` (at tree path `prefix`) into `out`. Errors: [`Error::Invalid`]
/// naming the tree path; [`read_leaves`] adds the file.
fn walk(v: &ValueRef<'_>, prefix: &str, out: &mut Vec<FlaxLeaf>) -> Result<()> {
    let here = if prefix.is_empty() { "the top level" } else { prefix };
    match v {
        ValueRef::Map(entries) => {
            for (k, child) in entries {
                let key = match k {
                    ValueRef::String(s) => s.as_str().ok_or_else(|| Error::Invalid(format!("{here}: a key is not UTF-8")))?,
                    other => return Err(Error::Invalid(format!("{here}: key {other} is not a string (a Flax parameter tree has string keys)"))),
                };
                if key == "__msgpack_chunked_array__" {
                    return Err(Error::Invalid(format!("{here}: an array over 1 GiB that Flax split in chunks: not supported")));
                }
                let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") };
                walk(child, &path, out)?;
            }
            Ok(())
        }
        ValueRef::Ext(1, payload) => {
            out.push(decode_leaf(prefix, payload)?);
            Ok(())
        }
        ValueRef::Ext(t, _) => Err(Error::Invalid(format!(
            "{here}: msgpack extension type {t} (Flax: 2 = complex, 3 = numpy scalar); only arrays (type 1) are supported"
        ))),
        other => Err(Error::Invalid(format!("{here}: {other} where a tensor (msgpack extension 1) or a map was expected"))),
    }
}

/// One array: the payload of an extension of type 1, `[shape, dtype name, raw bytes]`.
fn decode_leaf(path: &str, payload: &[u8]) -> Result<FlaxLeaf> {
    let mut rd = payload;
    let v = rmpv::decode::read_value_ref(&mut rd).map_err(|e| Error::Invalid(format!("{path}: the array's header is not msgpack ({e})")))?;
    let bad = || Error::Invalid(format!("{path}: an array is stored as [shape, dtype, bytes]; this one is not"));
    let ValueRef::Array(parts) = v else { return Err(bad()) };
    let [ValueRef::Array(dims), ValueRef::String(dtype), ValueRef::Binary(raw)] = parts.as_slice() else { return Err(bad()) };
    let shape = dims
        .iter()
        .map(|d| match d {
            ValueRef::Integer(i) => i.as_u64().map(|n| n as usize),
            _ => None,
        })
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(bad)?;
    let dtype = dtype.as_str().unwrap_or("?");
    let width = match dtype {
        "float32" => 4,
        "float16" | "bfloat16" => 2,
        other => return Err(Error::Invalid(format!("{path}: dtype {other} is not supported (float32, float16 or bfloat16)"))),
    };
    let count: usize = shape.iter().product();
    if count.checked_mul(width) != Some(raw.len()) {
        return Err(Error::Invalid(format!(
            "{path}: {} bytes for shape {shape:?} of {dtype} ({} expected): the file is damaged",
            raw.len(),
            count.saturating_mul(width)
        )));
    }
    let data = match dtype {
        "float32" => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        "float16" => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    };
    Ok(FlaxLeaf { path: path.to_string(), shape, data })
}

/// What a leaf becomes in the PyTorch model.
#[derive(Debug, PartialEq)]
enum Target {
    /// The tensor `name`, converted by `how`.
    Tensor { name: String, how: How },
    /// Not part of the model: left out, for this reason.
    Dropped(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum How {
    /// Copied (biases, layer-norm scales, embeddings, CLS token, position embeddings).
    Copy,
    /// A kernel: 2-D transposed, 4-D (the patch convolution, HWIO) to OIHW.
    Kernel,
    /// The original's `encoder_attn/c_attn` (`[3E, E]` kernel, `[3E]` bias): the first third
    /// (the query), then as a kernel.
    QueryThird,
}

/// Why the last two thirds of the original's `encoder_attn/c_attn` are left out.
const KV_THIRDS: &str = "the key/value thirds, which the original computes and discards (its keys/values come from c_attn_for_k_v)";

/// The original's module names that differ from transformers' (original, transformers), the
/// longer of two overlapping first: a block's `ln_3` is `ln_cross_attn`, its `encoder_attn` is
/// `crossattention`, whose query is (the first third of) `c_attn` and whose keys/values are
/// `c_attn_for_k_v`.
const ORIGINAL_NAMES: [(&[&str], &[&str]); 4] = [
    (&["encoder_attn", "c_attn_for_k_v"], &["crossattention", "c_attn"]),
    (&["encoder_attn", "c_attn"], &["crossattention", "q_attn"]),
    (&["encoder_attn"], &["crossattention"]),
    (&["ln_3"], &["ln_cross_attn"]),
];

/// Module names `parts` renamed through [`ORIGINAL_NAMES`], from the original's to transformers'
/// (`to_transformers`) or back.
fn rename<'a>(parts: &[&'a str], to_transformers: bool) -> Vec<&'a str> {
    let mut out = Vec::with_capacity(parts.len() + 1);
    let mut i = 0;
    while i < parts.len() {
        let rule = ORIGINAL_NAMES.iter().map(|&(o, t)| if to_transformers { (o, t) } else { (t, o) }).find(|(from, _)| parts[i..].starts_with(from));
        match rule {
            Some((from, to)) => {
                out.extend_from_slice(to);
                i += from.len();
            }
            None => {
                out.push(parts[i]);
                i += 1;
            }
        }
    }
    out
}

/// The PyTorch name of a Flax leaf `path` (e.g. `model/decoder/transformer/h/0/ln_3/scale` →
/// `decoder.transformer.h.0.ln_cross_attn.weight`). Names the model does not have are returned
/// as they come and reported as unexpected when the model is built. Errors: [`Error::Invalid`]
/// for an original-tree leaf outside `model/` (the caller adds the file).
fn target(tree: FlaxTree, path: &str) -> Result<Target> {
    let rest = match tree {
        FlaxTree::Original => path.strip_prefix("model/").ok_or_else(|| {
            Error::Invalid(format!("{path}: not under model/ (the original ViT-GPT2 keeps its encoder and decoder under model/); is this a transformers Flax checkpoint with an original config.json?"))
        })?,
        FlaxTree::Transformers => path,
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    let leaf = parts.pop().unwrap_or_default();
    if tree == FlaxTree::Original && parts.ends_with(&["attn", "c_attn_for_k_v"]) {
        return Ok(Target::Dropped("declared by the original's self-attention and never called"));
    }
    let mut names = if tree == FlaxTree::Original { rename(&parts, true) } else { parts };
    let how = match leaf {
        _ if names.ends_with(&["crossattention", "q_attn"]) && tree == FlaxTree::Original => How::QueryThird,
        "kernel" => How::Kernel,
        _ => How::Copy,
    };
    names.push(match leaf {
        "kernel" | "scale" | "embedding" => "weight",
        other => other,
    });
    Ok(Target::Tensor { name: names.join("."), how })
}

/// Where the PyTorch tensor `name` is stored in a Flax checkpoint of `tree` (for messages; layer
/// indices and `{0..11}` groups pass through).
pub fn stored_name(tree: FlaxTree, name: &str) -> String {
    let parts = split_outside_braces(name);
    let Some((leaf, modules)) = parts.split_last() else { return name.to_string() };
    let original = tree == FlaxTree::Original;
    let mut out = if original { [&["model"][..], &rename(modules, false)].concat() } else { modules.to_vec() };
    let parent = modules.last().copied().unwrap_or_default();
    out.push(match *leaf {
        "weight" if matches!(parent, "wte" | "wpe") => "embedding",
        "weight" if parent.starts_with("ln") || parent.starts_with("layernorm") => "scale",
        "weight" => "kernel",
        other => other,
    });
    let third = if original && modules.ends_with(&["crossattention", "q_attn"]) { " (first third)" } else { "" };
    format!("{}{third}", out.join("/"))
}

/// `name` split at the dots that are not inside a `{0..11}` group.
fn split_outside_braces(name: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in name.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                parts.push(&name[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&name[start..]);
    parts
}

/// `leaf` converted to its PyTorch layout (`n_embd`: the decoder width, for the query third).
/// Errors: [`Error::Invalid`] naming the leaf (the caller adds the file).
fn convert(leaf: FlaxLeaf, how: How, n_embd: usize) -> Result<Tensor> {
    let FlaxLeaf { path, shape, data } = leaf;
    let err = |e: candle_core::Error| Error::Invalid(format!("{path}: {e}"));
    let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).map_err(err)?;
    let t = match how {
        How::QueryThird => {
            let expected: &[usize] = if path.ends_with("/kernel") { &[3 * n_embd, n_embd] } else { &[3 * n_embd] };
            if shape != expected {
                return Err(Error::Invalid(format!(
                    "{path} has shape {shape:?}, expected {expected:?} (query, key and value rows of the decoder width n_embd = {n_embd})"
                )));
            }
            let q = t.narrow(0, 0, n_embd).map_err(err)?;
            if shape.len() == 2 { q.t().map_err(err)? } else { q }
        }
        How::Kernel => match shape.len() {
            2 => t.t().map_err(err)?,
            4 => t.permute((3, 2, 0, 1)).map_err(err)?,
            _ => return Err(Error::Invalid(format!("{path} has shape {shape:?}: a kernel is 2-D (4-D for the patch convolution)"))),
        },
        How::Copy => t,
    };
    t.contiguous().map_err(err)
}

/// Reads `path` (a `tree` checkpoint) into PyTorch names and layouts. `n_embd`: the decoder
/// width (config.json). Errors name the file and the tensor.
pub fn read(path: &Path, tree: FlaxTree, n_embd: usize) -> Result<FlaxWeights> {
    let mut out = FlaxWeights { tensors: Vec::new(), lm_head: None, dropped: Vec::new() };
    let mut dropped: Vec<(&'static str, String)> = Vec::new();
    for leaf in read_leaves(path)? {
        match target(tree, &leaf.path).map_err(|m| Error::checkpoint(path, m))? {
            Target::Dropped(why) => dropped.push((why, leaf.path)),
            Target::Tensor { name, how } => {
                if how == How::QueryThird {
                    dropped.push((KV_THIRDS, format!("{} rows {n_embd}..{}", leaf.path, 3 * n_embd)));
                }
                let t = convert(leaf, how, n_embd).map_err(|m| Error::checkpoint(path, m))?;
                if name == "decoder.lm_head.weight" {
                    out.lm_head = Some(t);
                } else {
                    out.tensors.push((name, t));
                }
            }
        }
    }
    let mut reasons: Vec<&'static str> = dropped.iter().map(|(r, _)| *r).collect();
    reasons.dedup();
    for why in reasons {
        let paths: Vec<String> = dropped.iter().filter(|(r, _)| *r == why).map(|(_, p)| p.clone()).collect();
        for g in super::checkpoint::group_names_by(&paths, '/') {
            out.dropped.push(format!("{g}: {why}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(tree: FlaxTree, path: &str) -> (String, How) {
        match target(tree, path).unwrap() {
            Target::Tensor { name, how } => (name, how),
            t => panic!("{path}: {t:?}"),
        }
    }

    #[test]
    fn original_names_map_to_transformers_and_back() {
        let o = FlaxTree::Original;
        let cases = [
            ("model/decoder/transformer/h/3/ln_3/scale", "decoder.transformer.h.3.ln_cross_attn.weight", How::Copy),
            ("model/decoder/transformer/h/3/encoder_attn/c_attn/kernel", "decoder.transformer.h.3.crossattention.q_attn.weight", How::QueryThird),
            ("model/decoder/transformer/h/3/encoder_attn/c_attn/bias", "decoder.transformer.h.3.crossattention.q_attn.bias", How::QueryThird),
            ("model/decoder/transformer/h/3/encoder_attn/c_attn_for_k_v/kernel", "decoder.transformer.h.3.crossattention.c_attn.weight", How::Kernel),
            ("model/decoder/transformer/h/3/encoder_attn/c_proj/bias", "decoder.transformer.h.3.crossattention.c_proj.bias", How::Copy),
            ("model/decoder/transformer/h/3/attn/c_attn/kernel", "decoder.transformer.h.3.attn.c_attn.weight", How::Kernel),
            ("model/decoder/transformer/wte/embedding", "decoder.transformer.wte.weight", How::Copy),
            ("model/decoder/transformer/ln_f/scale", "decoder.transformer.ln_f.weight", How::Copy),
            ("model/encoder/embeddings/patch_embeddings/projection/kernel", "encoder.embeddings.patch_embeddings.projection.weight", How::Kernel),
            ("model/encoder/embeddings/cls_token", "encoder.embeddings.cls_token", How::Copy),
            ("model/encoder/encoder/layer/0/layernorm_before/scale", "encoder.encoder.layer.0.layernorm_before.weight", How::Copy),
            ("model/encoder/pooler/dense/kernel", "encoder.pooler.dense.weight", How::Kernel),
        ];
        for (flax, torch, how) in cases {
            assert_eq!(tensor(o, flax), (torch.to_string(), how), "{flax}");
            let back = stored_name(o, torch);
            assert_eq!(back.trim_end_matches(" (first third)"), flax, "{torch}");
        }
        assert_eq!(target(o, "model/decoder/transformer/h/0/attn/c_attn_for_k_v/kernel").unwrap(), Target::Dropped("declared by the original's self-attention and never called"));
        assert!(target(o, "decoder/transformer/wte/embedding").unwrap_err().to_string().contains("not under model/"));
        // Grouped names from the loader's messages keep their index group.
        assert_eq!(stored_name(o, "decoder.transformer.h.{0..11}.ln_cross_attn.bias"), "model/decoder/transformer/h/{0..11}/ln_3/bias");
    }

    #[test]
    fn transformers_names_map_one_to_one() {
        let t = FlaxTree::Transformers;
        for (flax, torch) in [
            ("decoder/transformer/h/1/crossattention/q_attn/kernel", "decoder.transformer.h.1.crossattention.q_attn.weight"),
            ("decoder/transformer/h/1/ln_cross_attn/scale", "decoder.transformer.h.1.ln_cross_attn.weight"),
            ("decoder/lm_head/kernel", "decoder.lm_head.weight"),
            ("encoder/layernorm/bias", "encoder.layernorm.bias"),
        ] {
            assert_eq!(tensor(t, flax).0, torch);
            assert_eq!(stored_name(t, torch), flax);
        }
    }

    #[test]
    fn layouts_are_pytorch_layouts() {
        // A GPT-2 kernel stored [out, in] becomes Conv1D [in, out]; the patch kernel HWIO → OIHW.
        let leaf = |path: &str, shape: Vec<usize>| {
            let n = shape.iter().product::<usize>();
            FlaxLeaf { path: path.into(), shape, data: (0..n).map(|i| i as f32).collect() }
        };
        let t = convert(leaf("a/kernel", vec![2, 3]), How::Kernel, 0).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]);
        let p = convert(leaf("a/kernel", vec![2, 2, 3, 4]), How::Kernel, 0).unwrap();
        assert_eq!(p.dims(), &[4, 3, 2, 2]);
        // [o=1, i=2, h=1, w=0] = HWIO [1, 0, 2, 1] = 1·24 + 0·12 + 2·4 + 1.
        assert_eq!(p.get(1).unwrap().get(2).unwrap().get(1).unwrap().get(0).unwrap().to_scalar::<f32>().unwrap(), 33.0);
        // The query third: rows 0..E of [3E, E], transposed.
        let q = convert(leaf("x/encoder_attn/c_attn/kernel", vec![6, 2]), How::QueryThird, 2).unwrap();
        assert_eq!(q.to_vec2::<f32>().unwrap(), vec![vec![0., 2.], vec![1., 3.]]);
        let b = convert(leaf("x/encoder_attn/c_attn/bias", vec![6]), How::QueryThird, 2).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![0., 1.]);
        let e = convert(leaf("x/encoder_attn/c_attn/kernel", vec![6, 3]), How::QueryThird, 2).unwrap_err().to_string();
        assert!(e.starts_with("x/encoder_attn/c_attn/kernel has shape [6, 3], expected [6, 2]"), "{e}");
    }
}
