//! The candle host model against transformers (fixtures: scripts/make_candle_fixtures.py).
//!
//! Tolerances: logits are O(1..10) (|max| 6.4 in the fixture) and computed in float32 by both
//! sides with different summation orders (candle's gemm vs torch's MKL, our layer norm and
//! softmax written from basic ops); measured differences are ~1e-6, so 1e-4 absolute is tight
//! enough to catch any wrong tensor, scale or mask (a wrong one moves logits by > 1e-1) while
//! leaving headroom for float noise.
#![cfg(feature = "host")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use vitgpt2::generate::GenerationConfig;
use vitgpt2::assets::SpecialTokens;
use vitgpt2::model::{caption_loss, open_checkpoint, shift_tokens_right, VisionEncoderDecoder};

const LOGITS_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/candle")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).expect("reference.safetensors")
}

fn reference_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap()).unwrap()
}

fn ved() -> VisionEncoderDecoder {
    VisionEncoderDecoder::from_checkpoint(&fixtures().join("ved"), &Device::Cpu).expect("load ved").0
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The model's special tokens as every command resolves them (no generation_config.json here).
fn special(model: &VisionEncoderDecoder) -> SpecialTokens {
    SpecialTokens::resolve(&model.config, &Default::default()).unwrap()
}

fn labels(r: &HashMap<String, Tensor>) -> Vec<Vec<i64>> {
    r["labels"].to_vec2::<i64>().unwrap()
}

fn decoder_input_ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["decoder_input_ids"].to_dtype(DType::U32).unwrap()
}

#[test]
fn encoder_output_matches_transformers() {
    let r = reference();
    let enc = ved().encode(&r["pixel_values"], false).unwrap();
    let d = max_abs_diff(&enc, &r["encoder_hidden"]);
    eprintln!("encoder hidden (after enc_to_dec_proj): max |candle - transformers| = {d:.3e}");
    assert!(d < LOGITS_TOL, "{d}");
}

#[test]
fn full_sequence_logits_match_transformers() {
    let r = reference();
    let logits = ved().forward(&r["pixel_values"], &decoder_input_ids(&r), false).unwrap();
    let d = max_abs_diff(&logits, &r["logits"]);
    eprintln!("full-sequence logits: max |candle - transformers| = {d:.3e} (max |logit| {:.2})", max_abs(&r["logits"]));
    assert!(d < LOGITS_TOL, "{d}");
}

#[test]
fn cached_incremental_decoding_matches_transformers() {
    let r = reference();
    let model = ved();
    let ids = decoder_input_ids(&r);
    let len = ids.dim(1).unwrap();
    let enc = model.encode(&r["pixel_values"], false).unwrap();

    // One token per step, both images as two rows.
    let mut cache = model.start_cache(&enc).unwrap();
    let steps: Vec<Tensor> = (0..len).map(|t| model.decode_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap()).collect();
    let logits = Tensor::cat(&steps, 1).unwrap();
    let d = max_abs_diff(&logits, &r["logits_cached"]);
    eprintln!("cached step-by-step logits: max |candle - transformers| = {d:.3e}");
    assert!(d < LOGITS_TOL, "{d}");

    // A 3-token prefill then single steps: the causal mask with a cache offset.
    let mut cache = model.start_cache(&enc).unwrap();
    let mut parts = vec![model.decode_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache).unwrap()];
    for t in 3..len {
        parts.push(model.decode_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap());
    }
    let d = max_abs_diff(&Tensor::cat(&parts, 1).unwrap(), &r["logits"]);
    eprintln!("prefill(3) + steps vs full logits: max diff = {d:.3e}");
    assert!(d < LOGITS_TOL, "{d}");
}

#[test]
fn optional_gpt2_attention_scalings_match_transformers() {
    // scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn on (reference: eager attention,
    // since transformers' sdpa path ignores the layer scaling).
    let r = reference();
    let dir = fixtures().join("ved");
    let mut cfg = vitgpt2::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.decoder.scale_attn_by_inverse_layer_idx = true;
    cfg.decoder.reorder_and_upcast_attn = true;
    let (model, _) = VisionEncoderDecoder::from_checkpoint_with_config(&dir, &cfg, &Device::Cpu).unwrap();
    let logits = model.forward(&r["pixel_values"], &decoder_input_ids(&r), false).unwrap();
    let d = max_abs_diff(&logits, &r["logits_scaled"]);
    eprintln!("scaled-attention logits: max |candle - transformers| = {d:.3e}");
    assert!(d < LOGITS_TOL, "{d}");
    assert!(max_abs_diff(&logits, &r["logits"]) > 1e-2, "the scaling must change the logits");
}

#[test]
fn decoder_inputs_are_labels_shifted_right() {
    let r = reference();
    let shifted = shift_tokens_right(&labels(&r), 0, 1).unwrap();
    let expected: Vec<Vec<u32>> = decoder_input_ids(&r).to_vec2().unwrap();
    assert_eq!(shifted, expected);
}

/// Gradient tolerance: relative to the largest reference gradient of the tensor (gradients of
/// different tensors span 0.03..1 here; float32 noise scales with them). Measured: ~5e-6.
const GRAD_REL_TOL: f32 = 1e-4;
/// Some gradients are zero in exact arithmetic (the ViT key bias: softmax ignores a shift that
/// is the same for every key) and float noise (~1e-8) on both sides: compare those absolutely,
/// at GRAD_REL_TOL * GRAD_FLOOR = 1e-6.
const GRAD_FLOOR: f32 = 1e-2;

#[test]
fn loss_and_gradients_match_transformers() {
    let r = reference();
    let model = ved();
    let (loss, _) = model.loss(&r["pixel_values"], &labels(&r), &special(&model), false, false).unwrap();
    let loss_c = loss.to_scalar::<f32>().unwrap();
    let loss_t = r["loss"].to_scalar::<f32>().unwrap();
    eprintln!("loss: candle {loss_c:.7} transformers {loss_t:.7}");
    assert!((loss_c - loss_t).abs() < 1e-5 * loss_t.abs().max(1.0));

    let grads = loss.backward().unwrap();
    let mut worst = (0.0f32, String::new());
    let mut checked = 0;
    for (name, var) in model.params() {
        let key = format!("grad.{name}");
        match (grads.get(var.as_tensor()), r.get(&key)) {
            (Some(g), Some(reference)) => {
                let scale = max_abs(reference).max(GRAD_FLOOR);
                let rel = max_abs_diff(g, reference) / scale;
                if rel > worst.0 {
                    worst = (rel, name.clone());
                }
                assert!(rel < GRAD_REL_TOL, "{name}: relative gradient difference {rel:.3e}");
                checked += 1;
            }
            (None, None) => assert!(name.starts_with("encoder.pooler."), "{name} has no gradient"),
            (g, t) => panic!("{name}: candle gradient {}, transformers gradient {}", g.is_some(), t.is_some()),
        }
    }
    eprintln!("gradients of {checked} tensors: worst max|diff|/max|grad| = {:.3e} ({})", worst.0, worst.1);
    assert_eq!(checked, r.keys().filter(|k| k.starts_with("grad.")).count());
}

#[test]
fn one_adamw_step_changes_every_parameter() {
    let r = reference();
    let model = ved();
    let vars = model.trainable_vars();
    assert_eq!(vars.len(), model.params().len() - 2, "all but the pooler's weight and bias are trained");
    let names: Vec<&String> = model.params().keys().filter(|n| !n.starts_with("encoder.pooler.")).collect();
    let before: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW { lr: 1e-3, ..Default::default() }).unwrap();
    // Training mode: dropout on (the fixture's configs have 0.1 everywhere).
    let (loss, _) = model.loss(&r["pixel_values"], &labels(&r), &special(&model), true, false).unwrap();
    let grads = loss.backward().unwrap();
    // A op without a backward pass would cut every parameter below it out of the gradient store.
    let no_grad: Vec<&&String> = names.iter().zip(&vars).filter(|(_, v)| grads.get(v.as_tensor()).is_none()).map(|(n, _)| n).collect();
    assert!(no_grad.is_empty(), "no gradient reached: {no_grad:?}");
    opt.step(&grads).unwrap();
    let unchanged: Vec<&String> = names
        .iter()
        .zip(vars.iter().zip(&before))
        .filter(|(_, (v, b))| max_abs_diff(v.as_tensor(), b) == 0.0)
        .map(|(n, _)| *n)
        .collect();
    assert!(unchanged.is_empty(), "parameters not updated by one AdamW step: {unchanged:?}");
}

#[test]
fn dropout_only_in_training() {
    let r = reference();
    let model = ved();
    let ids = decoder_input_ids(&r);
    let eval1 = model.forward(&r["pixel_values"], &ids, false).unwrap();
    let eval2 = model.forward(&r["pixel_values"], &ids, false).unwrap();
    assert_eq!(max_abs_diff(&eval1, &eval2), 0.0);
    let train = model.forward(&r["pixel_values"], &ids, true).unwrap();
    assert!(max_abs_diff(&train, &eval1) > 1e-3, "dropout (p = 0.1) must change training logits");
}

#[test]
fn loss_ignores_padding_labels() {
    // Logits where the ignored positions are garbage must not change the loss.
    let logits = Tensor::new(&[[[0.0f32, 1.0, 2.0], [5.0, -5.0, 0.0]]], &Device::Cpu).unwrap();
    let a = caption_loss(&logits, &Tensor::new(&[[2i64, -100]], &Device::Cpu).unwrap()).unwrap();
    let expected = -(2.0f32 - (1.0f32 + 1f32.exp() + 2f32.exp()).ln());
    assert!((a.to_scalar::<f32>().unwrap() - expected).abs() < 1e-6);
}

#[test]
fn pretrained_parts_load_like_from_encoder_decoder_pretrained() {
    let dir = fixtures();
    let (model, report) = VisionEncoderDecoder::from_pretrained_parts(&dir.join("vit"), &dir.join("gpt2"), 0, &Device::Cpu).unwrap();
    eprint!("{report}");
    let expected: Vec<String> = reference_json()["initialised_from_parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(report.initialised, expected, "initialised tensors differ from transformers'");
    // Old-style buffers and the stored (tied) LM head are recognised, not loaded.
    assert!(report.ignored.contains(&"lm_head.weight".to_string()));
    assert!(report.ignored.contains(&"transformer.h.1.attn.masked_bias".to_string()));

    // Pretrained tensors: bit-identical to what transformers put in the VisionEncoderDecoder.
    let saved = candle_core::safetensors::load(dir.join("ved/model.safetensors"), &Device::Cpu).unwrap();
    for name in &report.loaded {
        let p = &model.params()[name];
        assert_eq!(max_abs_diff(p.as_tensor(), &saved[name]), 0.0, "{name}");
    }
    // New tensors: GPT-2's initialisation.
    for name in &report.initialised {
        let t = model.params()[name].as_tensor();
        let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let std = (t.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() - mean * mean).sqrt();
        let (want_mean, want_std) = if name.contains("ln_cross_attn.weight") {
            (1.0, 0.0)
        } else if name.ends_with("bias") {
            (0.0, 0.0)
        } else if name.contains(".c_proj.weight") {
            (0.0, 0.02 / 2.0) // 0.02 / sqrt(2 * n_layer)
        } else {
            (0.0, 0.02)
        };
        assert!((mean - want_mean).abs() < 0.01 && (std - want_std).abs() < 0.35 * want_std.max(0.01), "{name}: mean {mean} std {std}");
    }

    // With transformers' random tensors copied in, the logits are transformers'.
    for name in &report.initialised {
        model.set_param(name, &saved[name]).unwrap();
    }
    let r = reference();
    let logits = model.forward(&r["pixel_values"], &decoder_input_ids(&r), false).unwrap();
    let d = max_abs_diff(&logits, &r["logits"]);
    eprintln!("pretrained parts + transformers' cross-attention: max logits diff {d:.3e}");
    assert!(d < LOGITS_TOL, "{d}");
}

#[test]
fn parts_init_is_seeded() {
    let dir = fixtures();
    let load = |seed| VisionEncoderDecoder::from_pretrained_parts(&dir.join("vit"), &dir.join("gpt2"), seed, &Device::Cpu).unwrap().0;
    let (a, b, c) = (load(3), load(3), load(4));
    let name = "decoder.transformer.h.0.crossattention.q_attn.weight";
    assert_eq!(max_abs_diff(a.params()[name].as_tensor(), b.params()[name].as_tensor()), 0.0);
    assert!(max_abs_diff(a.params()[name].as_tensor(), c.params()[name].as_tensor()) > 0.0);
}

/// Saves a model built from the pretrained parts, reloads it, and (for scripts/check_roundtrip.py)
/// records candle's logits next to it. Set VITGPT2_ROUNDTRIP_DIR to keep the output.
#[test]
fn save_reload_roundtrip() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("VITGPT2_ROUNDTRIP_DIR").map(PathBuf::from).unwrap_or_else(|| tmp.path().join("ckpt"));
    let (model, _) = VisionEncoderDecoder::from_pretrained_parts(&dir.join("vit"), &dir.join("gpt2"), 0, &Device::Cpu).unwrap();
    model.save(&out).unwrap();
    model.write_assets(&out, &dir.join("vit"), &dir.join("gpt2")).unwrap();

    // Same tensor names as transformers' save_pretrained (no lm_head: tied).
    let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let theirs = candle_core::safetensors::load(dir.join("ved/model.safetensors"), &Device::Cpu).unwrap();
    let mut a: Vec<&String> = ours.keys().collect();
    let mut b: Vec<&String> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    let r = reference();
    let ids = decoder_input_ids(&r);
    let logits = model.forward(&r["pixel_values"], &ids, false).unwrap();
    let (again, report) = VisionEncoderDecoder::from_checkpoint(&out, &Device::Cpu).unwrap();
    assert!(report.initialised.is_empty());
    assert_eq!(max_abs_diff(&again.forward(&r["pixel_values"], &ids, false).unwrap(), &logits), 0.0);
    // What check_roundtrip.py compares transformers against.
    let record: HashMap<String, Tensor> = [
        ("pixel_values".to_string(), r["pixel_values"].clone()),
        ("decoder_input_ids".to_string(), r["decoder_input_ids"].clone()),
        ("logits".to_string(), logits),
    ]
    .into();
    candle_core::safetensors::save(&record, out.join("candle_logits.safetensors")).unwrap();
    // And the saved folder is a complete checkpoint for `caption`.
    open_checkpoint(&out, &Device::Cpu).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_error(dir: &Path) -> String {
    match VisionEncoderDecoder::from_checkpoint(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            let e = e.to_string();
            assert_eq!(e.lines().count(), 1, "errors are one line: {e}");
            e
        }
    }
}

#[test]
fn bad_checkpoints_are_refused_with_a_clear_message() {
    let src = fixtures().join("ved");
    let tmp = tempfile::tempdir().unwrap();
    let weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut HashMap<String, Tensor>)| -> PathBuf {
        let d = tmp.path().join(name);
        copy_dir(&src, &d);
        let mut w = weights.clone();
        edit(&mut w);
        candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
        d
    };

    let d = variant("missing", &|w| {
        w.remove("decoder.transformer.h.1.mlp.c_fc.weight");
    });
    let e = load_error(&d);
    assert!(e.contains("missing") && e.contains("decoder.transformer.h.1.mlp.c_fc.weight") && e.contains("model.safetensors"), "{e}");

    let d = variant("unexpected", &|w| {
        w.insert("encoder.classifier.weight".into(), Tensor::zeros((3, 24), DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_error(&d);
    assert!(e.contains("unexpected") && e.contains("encoder.classifier.weight"), "{e}");

    let d = variant("shape", &|w| {
        w.insert("decoder.transformer.wpe.weight".into(), Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_error(&d);
    assert!(e.contains("decoder.transformer.wpe.weight") && e.contains("shape"), "{e}");

    let d = variant("untied", &|w| {
        let wte = &w["decoder.transformer.wte.weight"];
        let head = (wte + 1.0).unwrap();
        w.insert("decoder.lm_head.weight".into(), head);
    });
    let e = load_error(&d);
    assert!(e.contains("tied"), "{e}");

    // A stored LM head equal to the embedding is fine (older save_pretrained wrote it).
    let d = variant("tied_head_stored", &|w| {
        let wte = w["decoder.transformer.wte.weight"].clone();
        w.insert("decoder.lm_head.weight".into(), wte);
    });
    VisionEncoderDecoder::from_checkpoint(&d, &Device::Cpu).unwrap();

    let d = tmp.path().join("no_weights");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let e = load_error(&d);
    assert!(e.contains("no model.safetensors, pytorch_model.bin or flax_model.msgpack"), "{e}");

    let e = load_error(&tmp.path().join("nowhere"));
    assert!(e.contains("nowhere"), "{e}");
}

/// The tract fixture bundle also holds transformers' model.safetensors: captions from the
/// candle model must be transformers' `generate` output (tests/fixtures/reference.json).
#[test]
fn host_captions_match_transformers_generate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("reference.json")).unwrap()).unwrap();
    let captioner = open_checkpoint(&root.join("tiny-vit-gpt2"), &Device::Cpu).unwrap();
    let base = captioner.generation_config().clone();
    let mut compared = 0;
    for image in reference["images"].as_array().unwrap() {
        let path = root.join("images").join(image["file"].as_str().unwrap());
        for (case, want) in image["generate"].as_object().unwrap() {
            // early_stopping is true/false/"never" in JSON, a string on the command line.
            let mut case_json = reference["cases"][case].clone();
            if let Some(b) = case_json.get("early_stopping").and_then(|v| v.as_bool()) {
                case_json["early_stopping"] = serde_json::Value::String(b.to_string());
            }
            let overrides: vitgpt2::GenerationOverrides = serde_json::from_value(case_json).unwrap();
            let gen: GenerationConfig = overrides.apply(&base).unwrap();
            let got = captioner.caption_file(&path, &gen).unwrap();
            let want_tokens: Vec<u32> = serde_json::from_value(want["tokens"].clone()).unwrap();
            assert_eq!(got.tokens, want_tokens, "{} {case}", image["file"]);
            assert_eq!(got.caption, want["text"].as_str().unwrap(), "{} {case}", image["file"]);
            compared += 1;
        }
    }
    assert!(compared >= 6);
}

#[test]
fn host_caption_cli_prints_json_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitgpt2-host"))
        .args(["caption", "--checkpoint"])
        .arg(root.join("tiny-vit-gpt2"))
        .arg("--json")
        .arg(root.join("images/street.jpg"))
        .arg(root.join("images/bad_not_an_image.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "one bad image: exit 1");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["image"].as_str().unwrap().ends_with("street.jpg"));
    assert!(lines[0]["caption"].is_string() && lines[0]["tokens"].is_array() && lines[0]["ms"]["total"].is_number());
    assert!(lines[1]["error"].as_str().unwrap().contains("bad_not_an_image.png"));
}

#[test]
fn host_init_cli_builds_a_checkpoint_from_parts() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("init");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_vitgpt2-host"))
        .args(["init", "--seed", "1", "--vit"])
        .arg(dir.join("vit"))
        .arg("--gpt2")
        .arg(dir.join("gpt2"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(stderr.contains("initialised 18 tensors"), "{stderr}");
    assert!(stderr.contains("decoder.transformer.h.{0..1}.crossattention.q_attn.weight"), "{stderr}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_vitgpt2-host"))
        .args(["caption", "--max-length", "5", "--checkpoint"])
        .arg(&out)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/street.jpg"))
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
}

/// A checkpoint whose only start token is `decoder.bos_token_id` (no top-level
/// decoder_start_token_id, no generation_config.json): captioning, the assets every command opens
/// and the training loss all start decoding from it.
#[test]
fn decoder_bos_alone_is_the_start_everywhere() {
    use vitgpt2::assets::{ModelAssets, Origin};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("ved"), dir.path());
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("decoder_start_token_id");
    cfg["decoder"]["bos_token_id"] = 5.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let cap = open_checkpoint(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(cap.generation_config().decoder_start_token_id, 5, "generation");
    let assets = ModelAssets::open(dir.path(), Origin::Checkpoint).unwrap();
    assert_eq!(assets.special.decoder_start, 5, "assets");
    // Training: the loss's decoder inputs are the labels shifted right after token 5.
    let r = reference();
    let (model, _) = VisionEncoderDecoder::from_checkpoint(dir.path(), &Device::Cpu).unwrap();
    let labels = labels(&r);
    let (loss, _) = model.loss(&r["pixel_values"], &labels, &assets.special, false, false).unwrap();
    let inputs = shift_tokens_right(&labels, 5, assets.special.pad).unwrap();
    assert!(inputs.iter().all(|row| row[0] == 5));
    let ids = Tensor::new(inputs, &Device::Cpu).unwrap();
    let logits = model.forward(&r["pixel_values"], &ids, false).unwrap();
    let want = caption_loss(&logits, &Tensor::new(labels, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
}
