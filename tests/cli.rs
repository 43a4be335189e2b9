//! `vitgpt2-node caption`: the interface other tools drive.

mod common;

use std::process::Command;

use common::{fixtures, reference};

fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vitgpt2-node"))
}

#[test]
fn caption_json_lines_match_reference_and_bad_image_fails_at_the_end() {
    let r = reference();
    let images = fixtures().join("images");
    let out = node()
        .args(["caption", "--precision", "fp32", "--json", "--model"])
        .arg(fixtures().join("tiny-vit-gpt2"))
        .arg(images.join("street.jpg"))
        .arg(images.join("bad_truncated.jpg"))
        .arg(images.join("gray.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a bad image makes the exit code 1");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "one line per image: {stdout}");
    for (line, name) in [(&lines[0], "street.jpg"), (&lines[2], "gray.png")] {
        let want = &r.images.iter().find(|i| i.file == name).unwrap().generate["greedy"];
        assert!(line["image"].as_str().unwrap().ends_with(name));
        let tokens: Vec<u32> = line["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(tokens, want.tokens);
        assert_eq!(line["caption"], want.text.as_str());
        assert!(line["score"].as_f64().unwrap() <= 0.0);
        for stage in ["decode", "preprocess", "encoder", "decoder", "total"] {
            assert!(line["ms"][stage].as_f64().unwrap() >= 0.0, "ms.{stage}");
        }
    }
    assert!(lines[1]["error"].as_str().unwrap().contains("bad_truncated.jpg"));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("error: image") && stderr.contains("bad_truncated.jpg"), "{stderr}");
}

#[test]
fn caption_plain_with_beam_flags() {
    let r = reference();
    let img = r.images.iter().find(|i| i.file == "palette.png").unwrap();
    let out = node()
        .args(["caption", "--precision", "fp32", "--num-beams", "4", "--no-repeat-ngram-size", "2", "--length-penalty", "0.6", "--min-length", "5", "--model"])
        .arg(fixtures().join("tiny-vit-gpt2"))
        .arg(fixtures().join("images").join("palette.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, format!("{}\n", img.generate["beam4_ngram2_lp06_min5"].text));
}

#[test]
fn broken_bundle_exits_2_with_one_line() {
    let out = node().args(["caption", "--model", "does/not/exist", "x.jpg"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: model bundle: does/not/exist"), "{stderr}");
}

#[test]
fn threads_flag_gives_the_same_caption() {
    let run = |threads: &str| {
        let out = node()
            .args(["caption", "--precision", "fp32", "--threads", threads, "--model"])
            .arg(fixtures().join("tiny-vit-gpt2"))
            .arg(fixtures().join("images").join("wide.webp"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("1"), run("2"));
}

/// `--dtype` picks the graphs by transformers.js's suffixes; `--json` says which ran; the older
/// `--precision int8` still works (any 8-bit form); a bad dtype is a usage error.
#[test]
fn dtype_flag_and_the_graphs_that_ran() {
    let bundle = fixtures().join("interop/optimum-all");
    let image = fixtures().join("interop/images/c_100x80.png");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("interop/reference.json")).unwrap()).unwrap();
    let out = node().args(["caption", "--json", "--dtype", "uint8", "--model"]).arg(&bundle).arg(&image).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["dtype"], "uint8");
    assert_eq!(line["graphs"], serde_json::json!(["onnx/encoder_model_uint8.onnx", "onnx/decoder_model_merged_uint8.onnx"]));
    assert_eq!(line["tokens"], r["onnxruntime"]["uint8"]["greedy"]["c_100x80.png"]["tokens"]);

    let out = node().args(["caption", "--json", "--precision", "int8", "--model"]).arg(fixtures().join("tiny-vit-gpt2")).arg(&image).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["dtype"], "q8", "the bundle's only 8-bit form");

    let out = node().args(["caption", "--dtype", "int4", "--model"]).arg(&bundle).arg(&image).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("int4") && err.contains("q8"), "{err}");

    let out = node().args(["describe", "--json", "--model"]).arg(&bundle).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dtypes: Vec<&str> = d["graph_sets"].as_array().unwrap().iter().map(|s| s["dtype"].as_str().unwrap()).collect();
    assert_eq!(dtypes, ["q8", "int8", "uint8", "fp32", "fp16", "q4"]);
    assert_eq!(d["auto"]["dtype"], "q8");
}
