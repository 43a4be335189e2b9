//! Bundles made by other tools run on the node (issue #13): Optimum's default export (a merged
//! decoder with an `If`), the dtype-suffixed forms transformers.js repositories ship (q8, int8,
//! uint8, fp16, q4), int8-only bundles and external data (`.onnx_data`, `.onnx.data`). The node's
//! tokens must equal onnxruntime's greedy and beam loops over exactly the same graphs
//! (tests/fixtures/interop/reference.json, made by scripts/make_interop_fixtures.py), and for fp32
//! transformers' `generate`.

mod common;

use std::path::PathBuf;

use common::fixtures;
use serde_json::Value;
use vitgpt2::bundle::{DtypeChoice, GraphLayout};
use vitgpt2::runtime::{self, LoadOptions};
use vitgpt2::{Captioner, GenerationOverrides};

fn interop() -> PathBuf {
    fixtures().join("interop")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(interop().join("reference.json")).unwrap()).unwrap()
}

fn open(bundle: &str, dtype: &str) -> Captioner {
    let choice: DtypeChoice = dtype.parse().unwrap();
    runtime::open(&interop().join(bundle), &LoadOptions { dtype: choice, layout: None, threads: 1 })
        .unwrap_or_else(|e| panic!("{bundle} --dtype {dtype}: {e}"))
}

/// Generation settings of reference.json's `settings.<name>` as overrides.
fn overrides(r: &Value, setting: &str) -> GenerationOverrides {
    let s = &r["settings"][setting];
    GenerationOverrides {
        num_beams: s["num_beams"].as_u64().map(|v| v as usize),
        max_length: s["max_length"].as_u64().map(|v| v as usize),
        no_repeat_ngram_size: s["no_repeat_ngram_size"].as_u64().map(|v| v as usize),
        length_penalty: s["length_penalty"].as_f64().map(|v| v as f32),
        early_stopping: s["early_stopping"].as_bool().map(|b| b.to_string()),
        ..Default::default()
    }
}

fn tokens(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// Rewrites the ONNX file at `path` with every `from` node (subgraphs included) turned into `to`.
fn replace_op(path: &std::path::Path, from: &str, to: &str) {
    use prost::Message;
    fn rename(g: &mut tract_onnx::pb::GraphProto, from: &str, to: &str) {
        for n in g.node.iter_mut() {
            if n.op_type == from {
                n.op_type = to.into();
            }
            for a in n.attribute.iter_mut() {
                if let Some(sub) = a.g.as_mut() {
                    rename(sub, from, to);
                }
            }
        }
    }
    let mut proto = tract_onnx::pb::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    rename(proto.graph.as_mut().unwrap(), from, to);
    std::fs::write(path, proto.encode_to_vec()).unwrap();
}

/// Every dtype of the all-dtypes bundle, every setting, every image: onnxruntime's tokens.
fn check_bundle(bundle: &str, dtypes: &[&str]) {
    let r = reference();
    for &dtype in dtypes {
        let mut worst = 0f64;
        let cap = open(bundle, dtype);
        assert_eq!(cap.engine().dtype(), dtype, "{bundle}: --dtype {dtype} ran {}", cap.engine().describe());
        assert!(cap.engine().describe().starts_with("optimum merged layout"), "{}", cap.engine().describe());
        for setting in ["greedy", "beam3", "beam3_ngram2"] {
            let gen = overrides(&r, setting).apply(cap.generation_config()).unwrap();
            for image in r["images"].as_object().unwrap().keys() {
                let got = cap.caption_file(&interop().join("images").join(image), &gen).unwrap();
                let want = &r["onnxruntime"][dtype][setting][image];
                assert_eq!(got.tokens, tokens(want), "{bundle} {dtype} {setting} {image}");
                if dtype == "fp32" {
                    let torch = &r["transformers_fp32"][setting][image];
                    assert_eq!(got.tokens, tokens(torch), "{bundle} fp32 {setting} {image}: transformers' generate");
                }
                if let Some(score) = want["score"].as_f64() {
                    // Same integer or f32 arithmetic: float noise only. fp16 graphs are widened to
                    // f32 at load while onnxruntime computes their activations in half precision (a
                    // 2^-11 ≈ 5e-4 relative step); q4's MatMulNBits dequantizes its blocks in
                    // another order in each runtime. q8 quantizes its activations at run time, so
                    // a last-bit difference in the f32 ops before it can round a value to the next
                    // step (likely why: reference.json was made on an AVX2 CPU, and on AVX-512
                    // tract's f32 kernels are others) — measured 2.1e-4 on one beam score on a Zen
                    // 4 (AVX-512 VNNI), where int8 and uint8 stayed within 4e-7; q8 passed 1e-4 on
                    // AVX2. Measured: see the printed worst differences.
                    let tol = match dtype {
                        "fp16" | "q4" => 4e-3,
                        "q8" => 1e-3,
                        _ => 1e-4,
                    };
                    let d = (got.score as f64 - score).abs();
                    worst = worst.max(d);
                    assert!(d < tol, "{bundle} {dtype} {setting} {image}: score {} vs {score}", got.score);
                }
            }
        }
        eprintln!("{bundle} {dtype}: tokens equal onnxruntime's on every image and setting; worst beam-score difference {worst:.1e}");
    }
}

#[test]
fn optimum_merged_export_every_dtype_equals_onnxruntime() {
    check_bundle("optimum-all", &["fp32", "q8", "int8", "uint8", "fp16", "q4"]);
}

#[test]
fn int8_only_bundle_runs_its_q8_graphs_by_default() {
    let r = reference();
    let cap = runtime::open(&interop().join("optimum-q8"), &LoadOptions::default()).unwrap();
    assert_eq!(cap.engine().dtype(), "q8");
    let gen = overrides(&r, "greedy").apply(cap.generation_config()).unwrap();
    for image in r["images"].as_object().unwrap().keys() {
        let got = cap.caption_file(&interop().join("images").join(image), &gen).unwrap();
        assert_eq!(got.tokens, tokens(&r["onnxruntime"]["q8"]["greedy"][image]), "{image}");
    }
}

#[test]
fn external_data_next_to_the_graph() {
    let r = reference();
    for bundle in ["extdata-underscore", "extdata-dot"] {
        let cap = open(bundle, "fp32");
        let gen = overrides(&r, "greedy").apply(cap.generation_config()).unwrap();
        for image in r["images"].as_object().unwrap().keys() {
            let got = cap.caption_file(&interop().join("images").join(image), &gen).unwrap();
            assert_eq!(got.tokens, tokens(&r["onnxruntime"]["fp32"]["greedy"][image]), "{bundle} {image}");
        }
    }
}

/// A missing or short external data file is one line naming it.
#[test]
fn missing_or_short_external_data_is_named() {
    let dir = common::bundle_copy("interop/extdata-underscore");
    let data = dir.path().join("onnx/decoder_model_merged.onnx_data");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
    let e = runtime::open(dir.path(), &LoadOptions::default()).err().expect("short data refused").to_string();
    assert!(e.contains("decoder_model_merged.onnx_data") && e.contains("too short") && !e.contains('\n'), "{e}");
    std::fs::remove_file(&data).unwrap();
    let e = runtime::open(dir.path(), &LoadOptions::default()).err().expect("missing data refused").to_string();
    assert!(e.contains("decoder_model_merged.onnx_data") && e.contains("missing"), "{e}");
}

/// A graph with an operator tract lacks: one line naming the file, the operator and a dtype of
/// the bundle that runs; `auto` passes over it.
#[test]
fn unsupported_operator_names_file_op_and_a_dtype_that_runs() {
    let dir = common::bundle_copy("interop/optimum-all");
    let onnx = dir.path().join("onnx");
    // Keep fp32 and q4; make q4's decoder use an operator no runtime here implements.
    for e in std::fs::read_dir(&onnx).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name == "encoder_model.onnx" || name == "decoder_model_merged.onnx" || name.ends_with("_q4.onnx")) {
            std::fs::remove_file(&p).unwrap();
        }
    }
    replace_op(&onnx.join("decoder_model_merged_q4.onnx"), "MatMulNBits", "MatMulFpQ4");

    let q4 = LoadOptions { dtype: "q4".parse().unwrap(), layout: None, threads: 1 };
    let e = runtime::open(dir.path(), &q4).err().expect("q4 refused").to_string();
    assert!(!e.contains('\n'), "{e}");
    for part in ["decoder_model_merged_q4.onnx", "com.microsoft:MatMulFpQ4", "--dtype fp32"] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
    let cap = runtime::open(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(cap.engine().dtype(), "fp32", "auto passes over the graphs that cannot run");
}

/// `--layout` picks the layout; asking for one the bundle lacks names what is missing.
#[test]
fn layout_choice() {
    let o = |layout| LoadOptions { dtype: DtypeChoice::Auto, layout: Some(layout), threads: 1 };
    let cap = runtime::open(&interop().join("optimum-all"), &o(GraphLayout::OptimumMerged)).unwrap();
    assert!(cap.engine().describe().starts_with("optimum merged layout"));
    let e = runtime::open(&interop().join("optimum-all"), &o(GraphLayout::Fast)).err().expect("no fast layout").to_string();
    assert!(e.contains("encoder_fast") && e.contains("missing graph"), "{e}");
}

/// An operator tract registers but cannot run in this form (GatherBlockQuantized over a rank-3
/// table): the same kind of one-line error, naming the operator.
#[test]
fn operator_in_a_form_tract_cannot_run_is_named() {
    let dir = common::bundle_copy("interop/optimum-all");
    replace_op(&dir.path().join("onnx/decoder_model_merged_q4.onnx"), "MatMulNBits", "GatherBlockQuantized");
    let e = runtime::open(dir.path(), &LoadOptions { dtype: "q4".parse().unwrap(), layout: None, threads: 1 }).err().expect("refused").to_string();
    for part in ["decoder_model_merged_q4.onnx", "GatherBlockQuantized", "--dtype"] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
}
