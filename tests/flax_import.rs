//! Flax checkpoints in the host model (issue #14), against references recorded with the original
//! ViT-GPT2 project's own Flax code (tests/fixtures/flax-original) and with transformers'
//! `FlaxVisionEncoderDecoderModel` (tests/fixtures/flax-transformers), both made by
//! scripts/make_flax_fixtures.py: no jax needed here.
//!
//! Tolerances: logits reach |30| here (ln_f is scaled up so that greedy margins are ≥ 0.10) and
//! both sides compute in float32 in other orders; a wrong tensor, layout or mask moves them by
//! ≥ 1 (the cross-attention mask alone by 13.7 to 23.7), so 1e-4 absolute catches every mistake
//! with room for float noise (measured: printed by each test, ≤ 2e-5).
#![cfg(feature = "host")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vitgpt2::model::{open_checkpoint, VisionEncoderDecoder};
use vitgpt2::{Captioner, GenerationOverrides};

const LOGITS_TOL: f32 = 1e-4;
/// Beam scores are means of log-probabilities (|score| ≤ 7 here): the same float noise.
const SCORE_TOL: f32 = 1e-4;
const FIXTURES: [&str; 2] = ["flax-original", "flax-transformers"];

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join(name)
}

fn image(file: &str) -> PathBuf {
    common::fixtures().join("images").join(file)
}

fn reference_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap()
}

fn reference_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn load(dir: &Path) -> VisionEncoderDecoder {
    VisionEncoderDecoder::from_checkpoint(dir, &Device::Cpu).expect("load the Flax checkpoint").0
}

/// `[1, 3, H, W]` pixel values of `file` as the checkpoint's captioner prepares them.
fn pixels(cap: &Captioner, file: &str) -> Tensor {
    let p = cap.pixel_values(&vitgpt2::preprocess::load_image(&image(file)).unwrap());
    let shape = p.shape().to_vec();
    Tensor::from_vec(p.iter().copied().collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

/// The street image's decoder inputs (`<s>` + the reference greedy ids) as `[1, T]` u32.
fn street_ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["street.jpg/decoder_input_ids"].to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn logits_match_the_flax_forward() {
    for name in FIXTURES {
        let (json, r) = (reference_json(name), reference_tensors(name));
        let model = load(&fixture(name));
        let cap = open_checkpoint(&fixture(name), &Device::Cpu).unwrap();
        let (mut worst_enc, mut worst_first) = (0f32, 0f32);
        for img in json["images"].as_array().unwrap() {
            let file = img["file"].as_str().unwrap();
            let pv = pixels(&cap, file);
            let sum = pv.sum_all().unwrap().to_scalar::<f32>().unwrap();
            let want = img["pixel_values_sum"].as_f64().unwrap() as f32;
            assert!((sum - want).abs() < 1e-2, "{name} {file}: pixel sum {sum} vs {want}");
            let enc = model.encode(&pv, false).unwrap().squeeze(0).unwrap();
            worst_enc = worst_enc.max(max_abs_diff(&enc, &r[&format!("{file}/encoder_hidden")]));
            let start = Tensor::new(&[[0u32]], &Device::Cpu).unwrap();
            let first = model.forward(&pv, &start, false).unwrap().flatten_all().unwrap();
            let want: Vec<f32> = serde_json::from_value(img["first_step_logits"].clone()).unwrap();
            worst_first = worst_first.max(max_abs_diff(&first, &Tensor::new(want.as_slice(), &Device::Cpu).unwrap()));
        }
        let logits = model.forward(&pixels(&cap, "street.jpg"), &street_ids(&r), false).unwrap().squeeze(0).unwrap();
        let full = max_abs_diff(&logits, &r["street.jpg/logits"]);
        eprintln!(
            "{name}: max |candle - flax|: encoder output {worst_enc:.2e} (5 images), first-step logits {worst_first:.2e} (5 images), \
             street.jpg logits at all 20 positions {full:.2e}"
        );
        assert!(worst_enc <= LOGITS_TOL && worst_first <= LOGITS_TOL && full <= LOGITS_TOL);
    }
}

/// The original's cross-attention is causal over the image tokens: with the setting off, candle
/// gives the references' non-causal logits (the original code with `causal=False`, which is what
/// a plain transformers model computes), far from the causal ones.
#[test]
fn the_causal_cross_attention_is_what_makes_the_original() {
    let name = "flax-original";
    let r = reference_tensors(name);
    let dir = fixture(name);
    let (model, _) = VisionEncoderDecoder::from_checkpoint(&dir, &Device::Cpu).unwrap();
    assert!(model.config.decoder.cross_attention_causal, "the importer sets it for the original");
    let mut cfg = model.config.clone();
    cfg.decoder.cross_attention_causal = false;
    let (plain, _) = VisionEncoderDecoder::from_checkpoint_with_config(&dir, &cfg, &Device::Cpu).unwrap();
    let cap = open_checkpoint(&dir, &Device::Cpu).unwrap();
    let logits = plain.forward(&pixels(&cap, "street.jpg"), &street_ids(&r), false).unwrap().squeeze(0).unwrap();
    let d = max_abs_diff(&logits, &r["street.jpg/noncausal_logits"]);
    let apart = max_abs_diff(&r["street.jpg/logits"], &r["street.jpg/noncausal_logits"]);
    eprintln!("setting off: max |candle - flax(causal=False)| = {d:.2e}; the mask moves the logits by {apart:.1}");
    assert!(d <= LOGITS_TOL);
    assert!(apart > 10.0);
    // transformers' Flax checkpoint is an ordinary one.
    assert!(!load(&fixture("flax-transformers")).config.decoder.cross_attention_causal);
}

/// With a KV cache the query at step t sees encoder positions 0..=t: one token at a time (and a
/// 3-token prefill, then single tokens) reproduces the full-sequence forward at every position.
#[test]
fn cached_decoding_reproduces_the_full_forward() {
    for name in FIXTURES {
        let r = reference_tensors(name);
        let model = load(&fixture(name));
        let cap = open_checkpoint(&fixture(name), &Device::Cpu).unwrap();
        let enc = model.encode(&pixels(&cap, "street.jpg"), false).unwrap();
        let ids = street_ids(&r);
        let len = ids.dim(1).unwrap();
        let mut cache = model.start_cache(&enc).unwrap();
        let steps: Vec<Tensor> = (0..len).map(|t| model.decode_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap()).collect();
        let one = max_abs_diff(&Tensor::cat(&steps, 1).unwrap().squeeze(0).unwrap(), &r["street.jpg/logits"]);
        let mut cache = model.start_cache(&enc).unwrap();
        let mut parts = vec![model.decode_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache).unwrap()];
        parts.extend((3..len).map(|t| model.decode_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap()));
        let pre = max_abs_diff(&Tensor::cat(&parts, 1).unwrap().squeeze(0).unwrap(), &r["street.jpg/logits"]);
        eprintln!("{name}: cached logits vs the full forward: one token at a time {one:.2e}, prefill 3 then steps {pre:.2e}");
        assert!(one <= LOGITS_TOL && pre <= LOGITS_TOL);
    }
}

/// Greedy (the original's full-sequence forward in a loop) and beam search (transformers 4.57's
/// rules, as vitgpt2's generate) through the host captioner: every case token for token, scores
/// within 1e-4.
#[test]
fn greedy_and_beam_search_equal_the_references() {
    for name in FIXTURES {
        let json = reference_json(name);
        let cap = open_checkpoint(&fixture(name), &Device::Cpu).unwrap();
        let max_length = json["max_length"].as_u64().unwrap() as usize;
        let (mut cases, mut worst) = (0, 0f32);
        for img in json["images"].as_array().unwrap() {
            let file = img["file"].as_str().unwrap();
            let picture = vitgpt2::preprocess::load_image(&image(file)).unwrap();
            let greedy = GenerationOverrides { num_beams: Some(1), max_length: Some(max_length), ..Default::default() };
            let got = cap.caption_image(&picture, &greedy.apply(cap.generation_config()).unwrap()).unwrap();
            let want: Vec<u32> = serde_json::from_value(img["greedy"]["tokens"].clone()).unwrap();
            assert_eq!(got.tokens, want, "{name} {file} greedy");
            cases += 1;
            for (case, b) in img["beams"].as_object().unwrap() {
                let s = &b["settings"];
                let o = GenerationOverrides {
                    num_beams: s["num_beams"].as_u64().map(|v| v as usize),
                    max_length: s["max_length"].as_u64().map(|v| v as usize),
                    min_length: Some(0),
                    no_repeat_ngram_size: Some(s["no_repeat_ngram_size"].as_u64().unwrap_or(0) as usize),
                    length_penalty: s["length_penalty"].as_f64().map(|v| v as f32),
                    early_stopping: Some(match &s["early_stopping"] {
                        Value::String(w) => w.clone(),
                        other => other.to_string(),
                    }),
                };
                let got = cap.caption_image(&picture, &o.apply(cap.generation_config()).unwrap()).unwrap();
                let want: Vec<u32> = serde_json::from_value(b["tokens"].clone()).unwrap();
                assert_eq!(got.tokens, want, "{name} {file} {case}");
                let d = (got.score - b["sequence_score"].as_f64().unwrap() as f32).abs();
                assert!(d <= SCORE_TOL, "{name} {file} {case}: score {} vs {}", got.score, b["sequence_score"]);
                worst = worst.max(d);
                cases += 1;
            }
        }
        eprintln!("{name}: {cases}/{cases} cases token-identical (5 greedy, 15 beam), beam scores within {worst:.2e}");
    }
}

/// The original's folder as it is downloaded has no preprocessor_config.json and no
/// generation_config.json: ViT's processor at the encoder's size and the original demo's beam
/// search stand in, and the captions are the same.
#[test]
fn the_original_folder_without_settings_files() {
    let dir = common::bundle_copy("flax-original");
    std::fs::remove_file(dir.path().join("preprocessor_config.json")).unwrap();
    for f in ["reference.json", "reference.safetensors", "params.txt", "README.md"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    let cap = open_checkpoint(dir.path(), &Device::Cpu).unwrap();
    let a = cap.assets();
    assert_eq!((a.preprocess.size.height, a.preprocess.size.width, a.preprocess.resample), (32, 32, 2));
    assert_eq!((a.preprocess.image_mean.clone(), a.preprocess.image_std.clone()), (vec![0.5; 3], vec![0.5; 3]));
    assert_eq!((a.generation.num_beams, a.generation.max_length), (8, 32));
    assert_eq!((a.special.decoder_start, a.special.eos.clone(), a.special.pad), (0, vec![2], 1));
    let json = reference_json("flax-original");
    let img = &json["images"][0];
    let o = GenerationOverrides { num_beams: Some(1), max_length: Some(20), ..Default::default() };
    let got = cap.caption_file(&image(img["file"].as_str().unwrap()), &o.apply(cap.generation_config()).unwrap()).unwrap();
    assert_eq!(serde_json::to_value(&got.tokens).unwrap(), img["greedy"]["tokens"]);
    // What the load left out on purpose is reported.
    let (_, report) = VisionEncoderDecoder::from_checkpoint(dir.path(), &Device::Cpu).unwrap();
    let text = report.to_string();
    assert!(text.contains("model/decoder/transformer/h/{0..1}/encoder_attn/c_attn/kernel rows 32..96: the key/value thirds"), "{text}");
}

// ---- broken checkpoints ------------------------------------------------------------------------

/// The fixture's msgpack tree, to break.
fn tree() -> rmpv::Value {
    let bytes = std::fs::read(fixture("flax-original").join("flax_model.msgpack")).unwrap();
    rmpv::decode::read_value(&mut bytes.as_slice()).unwrap()
}

/// The map entry at `path` (`a/b/c`) of `v`, created when `create`.
fn entry<'a>(v: &'a mut rmpv::Value, path: &str, create: bool) -> &'a mut rmpv::Value {
    let mut cur = v;
    for key in path.split('/') {
        let rmpv::Value::Map(entries) = cur else { panic!("{path}: not a map") };
        let i = match entries.iter().position(|(k, _)| k.as_str() == Some(key)) {
            Some(i) => i,
            None if create => {
                entries.push((key.into(), rmpv::Value::Map(Vec::new())));
                entries.len() - 1
            }
            None => panic!("{path}: no {key}"),
        };
        cur = &mut entries[i].1;
    }
    cur
}

/// A Flax array leaf: extension 1 holding `[shape, dtype, bytes]`.
fn array(shape: &[u64], dtype: &str, bytes: Vec<u8>) -> rmpv::Value {
    let header = rmpv::Value::Array(vec![shape.iter().map(|&d| rmpv::Value::from(d)).collect::<Vec<_>>().into(), dtype.into(), rmpv::Value::Binary(bytes)]);
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, &header).unwrap();
    rmpv::Value::Ext(1, payload)
}

/// The error of loading the original fixture with `break_it` applied to its tree.
fn load_broken(break_it: impl FnOnce(&mut rmpv::Value)) -> String {
    let dir = common::bundle_copy("flax-original");
    let mut v = tree();
    break_it(&mut v);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &v).unwrap();
    std::fs::write(dir.path().join("flax_model.msgpack"), bytes).unwrap();
    load_error(dir.path())
}

fn load_error(dir: &Path) -> String {
    let e = match VisionEncoderDecoder::from_checkpoint(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "one line: {e}");
    eprintln!("{e}");
    e
}

const H0: &str = "model/decoder/transformer/h/0";

#[test]
fn broken_flax_checkpoints_are_refused_in_one_line_naming_the_tensor() {
    let e = load_broken(|v| {
        let rmpv::Value::Map(m) = entry(v, &format!("{H0}/ln_3"), false) else { panic!() };
        m.retain(|(k, _)| k.as_str() != Some("bias"));
    });
    assert!(e.contains("1 tensor(s) missing: decoder.transformer.h.0.ln_cross_attn.bias (flax: model/decoder/transformer/h/0/ln_3/bias)"), "{e}");

    let e = load_broken(|v| *entry(v, &format!("{H0}/ln_4/scale"), true) = array(&[32], "float32", vec![0; 128]));
    assert!(e.contains("1 unexpected tensor(s): decoder.transformer.h.0.ln_4.weight (flax: model/decoder/transformer/h/0/ln_4/scale)"), "{e}");

    let e = load_broken(|v| *entry(v, &format!("{H0}/ln_1/scale"), false) = array(&[31], "float32", vec![0; 124]));
    assert!(e.contains("decoder.transformer.h.0.ln_1.weight (flax: model/decoder/transformer/h/0/ln_1/scale) has shape [31]"), "{e}");

    let e = load_broken(|v| *entry(v, &format!("{H0}/encoder_attn/c_attn/kernel"), false) = array(&[90, 32], "float32", vec![0; 90 * 128]));
    assert!(e.contains("model/decoder/transformer/h/0/encoder_attn/c_attn/kernel has shape [90, 32], expected [96, 32]"), "{e}");

    let e = load_broken(|v| *entry(v, "model/decoder/transformer/wte/embedding", false) = array(&[420, 32], "float32", vec![0; 420 * 128 - 4]));
    assert!(e.contains("model/decoder/transformer/wte/embedding: 53756 bytes for shape [420, 32] of float32 (53760 expected)"), "{e}");

    let e = load_broken(|v| *entry(v, "model/decoder/transformer/wpe/embedding", false) = array(&[64, 32], "int32", vec![0; 64 * 128]));
    assert!(e.contains("model/decoder/transformer/wpe/embedding: dtype int32 is not supported"), "{e}");

    let e = load_broken(|v| *entry(v, "model/decoder/transformer/wpe/embedding", false) = rmpv::Value::from(1.5));
    assert!(e.contains("model/decoder/transformer/wpe/embedding: 1.5 where a tensor (msgpack extension 1) or a map was expected"), "{e}");

    // A transformers Flax tree under an original config.json.
    let e = load_broken(|v| {
        let rmpv::Value::Map(m) = entry(v, "model", false).clone() else { panic!() };
        *v = rmpv::Value::Map(m);
    });
    assert!(e.contains("not under model/"), "{e}");
}

#[test]
fn folders_of_no_supported_kind_are_refused_in_one_line() {
    let dir = common::bundle_copy("flax-original");
    std::fs::write(dir.path().join("flax_model.msgpack"), b"\xde\x00\x05\xa1m").unwrap(); // a map of 5 entries, cut short
    assert!(load_error(dir.path()).contains("flax_model.msgpack: not a readable msgpack file"));

    std::fs::remove_file(dir.path().join("flax_model.msgpack")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("no model.safetensors, pytorch_model.bin or flax_model.msgpack: not a checkpoint vitgpt2 reads"), "{e}");

    let dir = common::bundle_copy("flax-original");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"model_type\": \"vit-gpt2\"", "\"model_type\": \"blip\"");
    std::fs::write(&cfg, text).unwrap();
    assert!(load_error(dir.path()).contains("config.json: model_type is `blip`: with flax_model.msgpack, vitgpt2 reads"));
}

// ---- convert, train, the node ------------------------------------------------------------------

/// `vitgpt2-host convert` writes a transformers checkpoint: every file, the same weights (the
/// converted folder gives bit-identical logits), the setting kept; transformers loads it with no
/// missing key, both tokenizer forms and the processor, and gives candle's logits and greedy ids
/// (for the original, once given the causal mask, which it ignores on its own).
#[test]
fn convert_writes_a_transformers_checkpoint() {
    for name in FIXTURES {
        let out = tempfile::tempdir().unwrap();
        let opts = vitgpt2::model::commands::ConvertOptions { checkpoint: fixture(name), out: out.path().to_path_buf() };
        assert_eq!(vitgpt2::model::commands::convert(&opts).unwrap(), 0);
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(out.path().join(f).is_file(), "{name}: {f} missing");
        }
        let (flax, converted) = (load(&fixture(name)), load(out.path()));
        assert_eq!(converted.config.decoder.cross_attention_causal, name == "flax-original");
        let r = reference_tensors(name);
        let cap = open_checkpoint(out.path(), &Device::Cpu).unwrap();
        let pv = pixels(&cap, "street.jpg");
        let a = flax.forward(&pv, &street_ids(&r), false).unwrap();
        let b = converted.forward(&pv, &street_ids(&r), false).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}: the converted weights are the same");
        if name == "flax-original" {
            let g: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("generation_config.json")).unwrap()).unwrap();
            assert_eq!((g["num_beams"].as_u64(), g["max_length"].as_u64(), g["decoder_start_token_id"].as_u64()), (Some(8), Some(32), Some(0)));
        }
        common::check_in_transformers(out.path(), &image("palette.png"), &format!("convert_writes_a_transformers_checkpoint ({name})"));
    }
    let same = vitgpt2::model::commands::ConvertOptions { checkpoint: fixture("flax-original"), out: fixture("flax-original") };
    assert!(vitgpt2::model::commands::convert(&same).unwrap_err().to_string().contains("is the checkpoint folder itself"));
}

/// `train --checkpoint` straight from the original's folder: the run trains with the causal
/// cross-attention and its model keeps the setting and both tokenizer forms.
#[test]
fn train_starts_from_the_original_folder() {
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("synth");
    vitgpt2::train::synth::write_set(&synth, 8, 5, 32).unwrap();
    let out = dir.path().join("run");
    let mut o = vitgpt2::train::options::TrainOptions::new(synth.join("captions.json"), out.clone());
    o.checkpoint = Some(fixture("flax-original"));
    o.val_fraction = 0.25;
    (o.batch_size, o.micro_batch, o.steps, o.warmup_steps) = (4, 4, Some(2), 1);
    (o.eval_images, o.eval_batches, o.workers, o.quiet) = (1, 1, 1, true);
    let s = vitgpt2::train::trainer::train(&o).unwrap();
    assert!(s.last_loss.unwrap().is_finite());
    let model = out.join("model");
    let cfg = vitgpt2::config::ModelConfig::from_file(&model.join("config.json")).unwrap();
    assert!(cfg.decoder.cross_attention_causal);
    for f in ["tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json", "generation_config.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let (trained, _) = VisionEncoderDecoder::from_checkpoint(&model, &Device::Cpu).unwrap();
    assert!(trained.params().contains_key("encoder.pooler.dense.weight"));
    open_checkpoint(&model, &Device::Cpu).unwrap();
}

/// A bundle whose config.json asks for the causal cross-attention but whose decoder graph was not
/// exported with it (e.g. by Optimum from a converted checkpoint) is refused, not run wrong.
#[test]
fn the_node_refuses_a_decoder_without_the_mask() {
    use prost::Message;
    let (model, _) = VisionEncoderDecoder::from_checkpoint(&fixture("flax-original"), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = vitgpt2::export::ExportOptions { out: out.path().to_path_buf(), layout: vitgpt2::export::Layout::Fast, fp32: true, int8: false, reduce_range: false };
    vitgpt2::export::export_bundle(&model, &fixture("flax-original"), &opts, serde_json::json!({})).unwrap();
    let opts = vitgpt2::runtime::LoadOptions::default();
    vitgpt2::runtime::open(out.path(), &opts).expect("the exported bundle loads");
    let path = out.path().join("decoder_step.onnx");
    let mut proto = tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    proto.metadata_props.retain(|p| p.key != "vitgpt2.cross_attention");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let e = vitgpt2::runtime::open(out.path(), &opts).err().expect("refused").to_string();
    assert!(e.contains("decoder_step.onnx: config.json sets decoder.cross_attention_causal"), "{e}");
}

/// The int8 fast-layout bundles in the node against the references: how far int8 moves the
/// first-step logits and how many greedy captions stay identical (reported; the fp32 graphs are
/// held to candle's tokens in tests/export_fast.rs).
#[test]
fn int8_bundles_against_the_references() {
    for name in FIXTURES {
        let (model, _) = VisionEncoderDecoder::from_checkpoint(&fixture(name), &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = vitgpt2::export::ExportOptions { out: out.path().to_path_buf(), layout: vitgpt2::export::Layout::Fast, fp32: false, int8: true, reduce_range: false };
        vitgpt2::export::export_bundle(&model, &fixture(name), &opts, serde_json::json!({})).unwrap();
        let node = vitgpt2::runtime::open(out.path(), &vitgpt2::runtime::LoadOptions::default()).unwrap();
        assert_eq!(node.engine().dtype(), "int8");
        let json = reference_json(name);
        let (mut same, mut prefix, mut worst, mut top1) = (0, Vec::new(), 0f32, 0);
        let images = json["images"].as_array().unwrap();
        for img in images {
            let file = img["file"].as_str().unwrap();
            let picture = vitgpt2::preprocess::load_image(&image(file)).unwrap();
            let enc = node.engine().encode(node.pixel_values(&picture)).unwrap();
            let first = enc.session(1).unwrap().step(&[0]).unwrap();
            let want: Vec<f32> = serde_json::from_value(img["first_step_logits"].clone()).unwrap();
            worst = worst.max(first.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())));
            let argmax = |v: &mut dyn Iterator<Item = f32>| v.enumerate().fold((0, f32::MIN), |b, (i, x)| if x > b.1 { (i, x) } else { b }).0;
            top1 += (argmax(&mut first.iter().copied()) == argmax(&mut want.iter().copied())) as usize;
            let o = GenerationOverrides { num_beams: Some(1), max_length: Some(20), ..Default::default() };
            let got = node.caption_image(&picture, &o.apply(node.generation_config()).unwrap()).unwrap().tokens;
            let want: Vec<u32> = serde_json::from_value(img["greedy"]["tokens"].clone()).unwrap();
            same += (got == want) as usize;
            prefix.push(got.iter().zip(&want).take_while(|(a, b)| a == b).count());
        }
        eprintln!(
            "{name}: int8 fast layout vs the Flax references: first-step logits max |diff| {worst:.3} (top-1 equal on {top1}/{n}); \
             greedy captions identical on {same}/{n}; identical prefix lengths {prefix:?} (of 19 or fewer ids)",
            n = images.len()
        );
        assert!(top1 >= images.len() - 1, "int8 changes the first token on more than one image");
    }
}
