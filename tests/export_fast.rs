//! `vitgpt2-host export` (fast layout) against the candle model: the exported fp32 graphs run
//! in tract through the ordinary `Captioner` and give the candle model's logits (≤ 1e-4 at
//! every step of full greedy runs, fast and Optimum layouts) and its captions (greedy and beam search); the int8 graphs
//! load and caption.
#![cfg(feature = "host")]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use vitgpt2::bundle::{GraphFiles, Precision};
use vitgpt2::export::{export_bundle, ExportOptions, Layout};
use vitgpt2::generate::DecoderSession;
use vitgpt2::model::{HostCaptioner, VisionEncoderDecoder};
use vitgpt2::{Captioner, GenerationOverrides, LoadOptions};

const LOGITS_TOL: f32 = 1e-4;
const IMAGES: [&str; 4] = ["street.jpg", "garden_444.jpg", "gray.png", "wide.webp"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn export(ckpt: &Path, layout: Layout, int8: bool) -> tempfile::TempDir {
    let (model, _) = VisionEncoderDecoder::from_checkpoint(ckpt, &Device::Cpu).expect("load checkpoint");
    let dir = tempfile::tempdir().unwrap();
    let opts = ExportOptions { out: dir.path().to_path_buf(), layout, fp32: true, int8 };
    let files = export_bundle(&model, ckpt, &opts, serde_json::json!({"test": true})).expect("export");
    assert_eq!(files.iter().any(|f| f.file == "encoder_fast.onnx"), layout != Layout::Optimum);
    assert_eq!(files.iter().any(|f| f.file == "decoder_with_past_model.onnx"), layout != Layout::Fast);
    assert!(dir.path().join("manifest.json").is_file());
    dir
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
}

/// Steps tract and candle side by side along candle's greedy path; returns the worst logit difference.
fn greedy_logits_diff(cap: &Captioner, host: &HostCaptioner, image: &Path) -> (f32, usize) {
    let img = vitgpt2::preprocess::load_image(image).unwrap();
    let pixels = cap.pixel_values(&img);
    let shape = pixels.shape().to_vec();
    let pt = Tensor::from_vec(pixels.iter().copied().collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap();
    let enc = host.model().encode(&pt, false).unwrap();
    let mut hs = host.model().session(&enc, 1).unwrap();
    let encoding = cap.runtime().encode(pixels).unwrap();
    let mut ts = encoding.session(1).unwrap();
    let gen = cap.generation_config();
    let mut tok = gen.decoder_start_token_id;
    let mut worst = 0f32;
    let mut steps = 0;
    for _ in 0..gen.max_length {
        let a = ts.step(&[tok]).unwrap();
        let b = hs.step(&[tok]).unwrap();
        assert_eq!(a.shape(), b.shape());
        let d = a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(d);
        steps += 1;
        tok = argmax(b.row(0).as_slice().unwrap());
        if gen.eos_token_ids.contains(&tok) {
            break;
        }
    }
    (worst, steps)
}

fn check_checkpoint(ckpt: &Path, layout: Layout) {
    let dir = export(ckpt, layout, true);
    let cap = Captioner::load(dir.path(), &LoadOptions { precision: Precision::Fp32, threads: 1 }).expect("load fp32 bundle");
    match layout {
        Layout::Optimum => assert!(matches!(cap.bundle().graphs, GraphFiles::Optimum { quantized: false, .. })),
        _ => assert!(matches!(cap.bundle().graphs, GraphFiles::Fast { quantized: false, .. }), "{:?}", cap.bundle().graphs),
    }
    let host = HostCaptioner::load(ckpt, &Device::Cpu).unwrap();
    for name in IMAGES {
        let path = root().join("tests/fixtures/images").join(name);
        let (d, steps) = greedy_logits_diff(&cap, &host, &path);
        eprintln!("{layout:?} {}: {name}: {steps} greedy steps, max |tract - candle| logits = {d:.2e}", ckpt.display());
        assert!(d <= LOGITS_TOL, "{name}: {d}");
        let img = vitgpt2::preprocess::load_image(&path).unwrap();
        for beams in [1, 3] {
            let gen = GenerationOverrides { num_beams: Some(beams), ..Default::default() }.apply(cap.generation_config()).unwrap();
            let t = cap.caption_image(&img, &gen).unwrap();
            let h = host.caption_image(&img, &gen).unwrap();
            assert_eq!(t.tokens, h.tokens, "{name}, {beams} beams");
        }
    }
    // int8: chosen by default (Auto), runs, and mostly agrees with fp32.
    let q = Captioner::load(dir.path(), &LoadOptions::default()).expect("load int8 bundle");
    assert!(q.bundle().graphs.quantized());
    let mut same = 0;
    for name in IMAGES {
        let img = vitgpt2::preprocess::load_image(&root().join("tests/fixtures/images").join(name)).unwrap();
        let gen = q.generation_config().clone();
        let a = q.caption_image(&img, &gen).unwrap();
        let b = cap.caption_image(&img, &gen).unwrap();
        assert!(a.score.is_finite());
        same += (a.tokens == b.tokens) as usize;
    }
    eprintln!("{}: int8 greedy tokens equal fp32's on {same}/{} images", ckpt.display(), IMAGES.len());
}

#[test]
fn tiny_vit_gpt2_fast_layout_matches_candle() {
    check_checkpoint(&root().join("tests/fixtures/tiny-vit-gpt2"), Layout::Fast);
}

/// Encoder width 24, decoder width 32: `enc_to_dec_proj` is in the encoder graph.
#[test]
fn projected_encoder_fast_layout_matches_candle() {
    check_checkpoint(&root().join("tests/fixtures/candle/ved"), Layout::Fast);
}

/// The Optimum layout (encoder_model, decoder_model, decoder_with_past_model) through the
/// runtime's Optimum path.
#[test]
fn optimum_layout_matches_candle() {
    check_checkpoint(&root().join("tests/fixtures/tiny-vit-gpt2"), Layout::Optimum);
    check_checkpoint(&root().join("tests/fixtures/candle/ved"), Layout::Optimum);
}

/// `vitgpt2-node bench` on an exported bundle: every figure is there (a smoke test, not timed).
#[test]
fn bench_reports_every_figure() {
    let dir = export(&root().join("tests/fixtures/tiny-vit-gpt2"), Layout::Fast, true);
    let args = vitgpt2::bench::BenchArgs {
        model: dir.path().to_path_buf(),
        threads: vec![1, 2],
        precision: Precision::Int8,
        reps: 1,
        past: vec![1, 8],
        tokens: 8,
        json: true,
        profile: false,
    };
    let r = vitgpt2::bench::bench(&args).unwrap();
    assert!(r.quantized);
    assert_eq!(r.results.len(), 2);
    for t in &r.results {
        assert!(t.encoder_ms > 0.0 && t.greedy_caption_ms > 0.0 && t.beam4_caption_ms > 0.0);
        assert_eq!(t.token_ms.len(), 2);
        assert!(t.peak_rss_mib > 0.0);
    }
    vitgpt2::bench::profile(&args).unwrap();
}
