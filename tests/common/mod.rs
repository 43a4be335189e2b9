//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

#[derive(Deserialize)]
pub struct Reference {
    pub cases: BTreeMap<String, serde_json::Value>,
    pub images: Vec<RefImage>,
}

#[derive(Deserialize)]
pub struct RefImage {
    pub file: String,
    pub pixel_values: Vec<f32>,
    pub first_step_logits: Vec<f32>,
    pub generate: BTreeMap<String, RefGen>,
    pub ort_int8_greedy: Vec<u32>,
    pub ort_fp32_greedy: Vec<u32>,
}

#[derive(Deserialize)]
pub struct RefGen {
    pub tokens: Vec<u32>,
    pub text: String,
    pub score: Option<f32>,
}

pub fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("tests/fixtures/reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

/// A copy of a fixture bundle in a temporary directory, to break on purpose.
pub fn bundle_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&fixtures().join(name), dir.path());
    dir
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Says, where a reader of `cargo test` sees it (libtest captures `eprintln!`, not direct
/// writes), that a check did not run and how to run it.
pub fn skipped(test: &str, how: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n{test}: SKIPPED — {how}");
}

/// A Python with torch and transformers (`VITGPT2_PYTHON`), for the checks that load vitgpt2's
/// checkpoints in transformers itself. Without one the check says it skipped, except under `CI`,
/// where it fails.
#[cfg(feature = "host")]
pub fn python_with_transformers(test: &str) -> Option<std::ffi::OsString> {
    let how = "set VITGPT2_PYTHON to a Python with torch and transformers (e.g. .venv-ref/bin/python) to run this check";
    let python = std::env::var_os("VITGPT2_PYTHON");
    let ok = python.as_ref().is_some_and(|p| {
        std::process::Command::new(p).args(["-c", "import torch, transformers, safetensors"]).output().is_ok_and(|o| o.status.success())
    });
    if ok {
        return python;
    }
    assert!(std::env::var_os("CI").is_none(), "{test}: CI must set VITGPT2_PYTHON to a Python with torch and transformers");
    skipped(test, how);
    None
}

/// Loads the checkpoint folder `ckpt` in transformers (`scripts/check_transformers_load.py`):
/// nothing missing or unexpected, both tokenizer forms, the image processor, and candle's pixel
/// values, full-sequence logits (≤ 1e-4) and greedy ids on `image` (with the causal
/// cross-attention mask passed to transformers when config.json asks for it). Skipped (failing
/// under `CI`) without a Python with transformers.
#[cfg(feature = "host")]
pub fn check_in_transformers(ckpt: &std::path::Path, image: &std::path::Path, test: &str) {
    use candle_core::{Device, Tensor};
    let Some(python) = python_with_transformers(test) else { return };
    let cap = vitgpt2::model::open_checkpoint(ckpt, &Device::Cpu).expect("open the checkpoint");
    let (model, _) = vitgpt2::model::VisionEncoderDecoder::from_checkpoint(ckpt, &Device::Cpu).unwrap();
    let img = vitgpt2::preprocess::load_image(image).unwrap();
    let max_length = 20.min(model.config.decoder.n_positions);
    let gen = vitgpt2::GenerationOverrides { num_beams: Some(1), max_length: Some(max_length), ..Default::default() }
        .apply(cap.generation_config())
        .unwrap();
    let greedy = cap.caption_image(&img, &gen).unwrap().tokens;
    let pixels = cap.pixel_values(&img);
    let shape = pixels.shape().to_vec();
    let pv = Tensor::from_vec(pixels.iter().copied().collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap();
    let mut ids = vec![gen.decoder_start_token_id];
    ids.extend(&greedy);
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let logits = model.forward(&pv, &ids, false).unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(candle_core::DType::I64).unwrap();
    let n_greedy = greedy.len();
    let tensors: std::collections::HashMap<String, Tensor> = [
        ("pixel_values".to_string(), pv),
        ("decoder_input_ids".to_string(), as_i64(&ids)),
        ("logits".to_string(), logits),
        ("greedy".to_string(), as_i64(&Tensor::from_vec(greedy, n_greedy, &Device::Cpu).unwrap())),
    ]
    .into();
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("candle.safetensors");
    candle_core::safetensors::save(&tensors, &record).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_transformers_load.py");
    let out = std::process::Command::new(&python).arg(script).arg(ckpt).arg(&record).arg(image).output().expect("run scripts/check_transformers_load.py");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{test}:\n{text}");
    assert!(out.status.success(), "{test}: scripts/check_transformers_load.py failed:\n{text}");
}
