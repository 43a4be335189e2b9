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
