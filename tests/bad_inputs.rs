//! Every broken bundle or image gives one clear line that names the file and the problem.

mod common;

use std::path::Path;

use common::{bundle_copy, fixtures};
use vitgpt2::bundle::Precision;
use vitgpt2::runtime::{self, LoadOptions};

fn load_err(dir: &Path, precision: Precision) -> String {
    match runtime::open(dir, &LoadOptions { dtype: precision.into(), threads: 1, ..Default::default() }) {
        Ok(_) => panic!("bundle {} loaded but should not", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn missing_bundle_dir() {
    let msg = load_err(Path::new("no/such/bundle"), Precision::Auto);
    assert_has(&msg, &["no/such/bundle", "not a directory"]);
}

#[test]
fn missing_graph() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::remove_file(d.path().join("encoder_model.onnx")).unwrap();
    let msg = load_err(d.path(), Precision::Fp32);
    assert_has(&msg, &["encoder_model.onnx", "missing"]);
}

#[test]
fn missing_config() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["config.json", "missing file"]);
}

#[test]
fn not_onnx() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::write(d.path().join("decoder_model.onnx"), b"<html>404 not found</html>").unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["decoder_model.onnx", "not a readable ONNX model"]);
}

#[test]
fn truncated_onnx() {
    let d = bundle_copy("tiny-vit-gpt2");
    let p = d.path().join("decoder_with_past_model.onnx");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["decoder_with_past_model.onnx", "not a readable ONNX model"]);
}

#[test]
fn truncated_int8_graph_in_onnx_folder() {
    let d = bundle_copy("tiny-vit-gpt2");
    let p = d.path().join("onnx").join("encoder_model_quantized.onnx");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    assert_has(&load_err(d.path(), Precision::Auto), &["onnx/encoder_model_quantized.onnx", "not a readable ONNX model"]);
}

#[test]
fn graphs_swapped() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::copy(d.path().join("decoder_model.onnx"), d.path().join("encoder_model.onnx")).unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["encoder_model.onnx", "wrong inputs", "pixel_values"]);
}

#[test]
fn decoder_not_gpt2() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("config.json"), |v| v["decoder"]["model_type"] = "bert".into());
    assert_has(&load_err(d.path(), Precision::Fp32), &["config.json", "must be GPT-2", "bert"]);
}

#[test]
fn config_not_json() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::write(d.path().join("config.json"), "{ \"encoder\": ").unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["config.json", "not a VisionEncoderDecoder config.json"]);
}

#[test]
fn tokenizer_larger_than_model_vocab() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("config.json"), |v| v["decoder"]["vocab_size"] = 300.into());
    assert_has(&load_err(d.path(), Precision::Fp32), &["tokenizer.json", "420 tokens", "vocab_size is 300"]);
}

#[test]
fn logits_width_differs_from_config() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("config.json"), |v| v["decoder"]["vocab_size"] = 500.into());
    assert_has(&load_err(d.path(), Precision::Fp32), &["decoder_model.onnx", "logits have 420 entries", "vocab_size = 500"]);
}

#[test]
fn hidden_size_differs_from_graph() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("config.json"), |v| {
        v["encoder"]["hidden_size"] = 64.into();
    });
    assert_has(&load_err(d.path(), Precision::Fp32), &["decoder_model.onnx", "encoder_hidden_states", "do not belong together"]);
}

#[test]
fn image_size_differs_from_preprocessor() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("preprocessor_config.json"), |v| v["size"] = serde_json::json!({"height": 64, "width": 64}));
    assert_has(&load_err(d.path(), Precision::Fp32), &["preprocessor_config.json", "64x64", "image_size 32"]);
}

#[test]
fn unsupported_resample() {
    let d = bundle_copy("tiny-vit-gpt2");
    edit_json(&d.path().join("preprocessor_config.json"), |v| v["resample"] = 3.into());
    assert_has(&load_err(d.path(), Precision::Fp32), &["preprocessor_config.json", "resample = 3"]);
}

#[test]
fn no_tokenizer() {
    let d = bundle_copy("tiny-vit-gpt2");
    for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
        std::fs::remove_file(d.path().join(f)).unwrap();
    }
    assert_has(&load_err(d.path(), Precision::Fp32), &["no tokenizer", "vocab.json"]);
}

#[test]
fn corrupt_tokenizer() {
    let d = bundle_copy("tiny-vit-gpt2");
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert_has(&load_err(d.path(), Precision::Fp32), &["tokenizer.json", "not a valid tokenizer.json"]);
}

#[test]
fn int8_asked_but_absent() {
    let msg = load_err(&fixtures().join("tiny-vit-gpt2-vocab-merges"), Precision::Int8);
    assert_has(&msg, &["encoder_model_quantized.onnx", "missing graph"]);
}

#[test]
fn bad_images_are_named() {
    let c = runtime::open(&fixtures().join("tiny-vit-gpt2"), &LoadOptions { dtype: Precision::Fp32.into(), threads: 1, ..Default::default() }).unwrap();
    let gen = c.generation_config().clone();
    for (name, expect) in [
        ("bad_truncated.jpg", "truncated JPEG"),
        ("bad_not_an_image.png", "not a supported image"),
        ("no_such_file.jpg", "cannot read"),
    ] {
        let p = fixtures().join("images").join(name);
        let msg = c.caption_file(&p, &gen).unwrap_err().to_string();
        assert_has(&msg, &[name, expect]);
        assert!(!msg.contains('\n'));
    }
}
