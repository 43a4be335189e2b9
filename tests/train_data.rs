//! Training data: the COCO and flat-record loaders (a missing image, a corrupt JPEG), the
//! synthetic set's determinism, BPE training round trip.
#![cfg(feature = "host")]

use std::path::Path;

use vitgpt2::preprocess::PreprocessConfig;
use vitgpt2::tokenizer::CaptionTokenizer;
use vitgpt2::train::data::{decode_batch, load_captions, DataOrder};

fn jpeg(path: &Path, seed: u8) {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 5 + seed, y as u8 * 7, seed]));
    img.save(path).unwrap();
}

/// A JPEG header and end marker around garbage: found, but does not decode.
fn corrupt_jpeg(path: &Path) {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    bytes.extend((0..200).map(|i| (i * 37 % 251) as u8));
    bytes.extend([0xFF, 0xD9]);
    std::fs::write(path, bytes).unwrap();
}

fn pre() -> PreprocessConfig {
    let mut p = PreprocessConfig::default();
    p.size.height = 16;
    p.size.width = 16;
    p
}

#[test]
fn coco_captions_with_missing_and_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    jpeg(&images.join("a.jpg"), 1);
    jpeg(&images.join("b.jpg"), 2);
    corrupt_jpeg(&images.join("c.jpg"));
    let coco = serde_json::json!({
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.jpg", "width": 40, "height": 30},
            {"id": 4, "file_name": "missing.jpg", "width": 40, "height": 30}
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "un chat sur un canapé"},
            {"id": 11, "image_id": 1, "caption": "un chat qui dort"},
            {"id": 12, "image_id": 2, "caption": "une voiture rouge"},
            {"id": 13, "image_id": 3, "caption": "une image abîmée"},
            {"id": 14, "image_id": 4, "caption": "une image absente"},
            {"id": 15, "image_id": 4, "caption": "encore absente"}
        ]
    });
    let path = dir.path().join("captions.json");
    std::fs::write(&path, coco.to_string()).unwrap();
    let set = load_captions(&path, None, "caption").unwrap();
    assert_eq!(set.samples.len(), 4, "a, a, b, c (c fails only when decoded)");
    assert_eq!(set.skipped.len(), 1, "the missing image is reported once: {:?}", set.skipped);
    assert!(set.skipped[0].contains("missing.jpg") && set.skipped[0].contains("missing"));
    let refs = set.references();
    assert_eq!(refs.len(), 3);
    assert_eq!(refs[0].1, vec!["un chat sur un canapé", "un chat qui dort"]);

    // The corrupt JPEG is reported and left out of its batch, the others decode.
    let batch = decode_batch(&set.samples, &[0, 3, 2], &pre(), 2);
    assert_eq!(batch.rows, vec![0, 2]);
    assert_eq!(batch.pixels.len(), 2 * 3 * 16 * 16);
    assert_eq!(batch.failed.len(), 1);
    assert!(batch.failed[0].contains("c.jpg"), "{:?}", batch.failed);

    // --verify-images drops it up front.
    let mut set = set;
    assert_eq!(set.verify_images(2), 1);
    assert_eq!(set.samples.len(), 3);
    assert!(set.skip_report("x").unwrap().contains("c.jpg"));
}

#[test]
fn flat_records_array_and_json_lines_with_field_selection() {
    let dir = tempfile::tempdir().unwrap();
    jpeg(&dir.path().join("000000000042.jpg"), 3);
    jpeg(&dir.path().join("000000123456.jpg"), 4);
    let records = serde_json::json!([
        {"image_id": 42, "id": 1, "caption": "A cat.", "en": "A cat.", "fr": "Un chat."},
        {"image_id": 123456, "id": 2, "caption": "A dog.", "en": "A dog.", "fr": "Un chien."},
        {"image_id": 7, "id": 3, "caption": "Gone.", "en": "Gone.", "fr": "Absente."},
        {"image_id": 42, "id": 4, "caption": "No French.", "en": "No French."}
    ]);
    let arr = dir.path().join("records.json");
    std::fs::write(&arr, records.to_string()).unwrap();
    let set = load_captions(&arr, None, "fr").unwrap();
    let caps: Vec<&str> = set.samples.iter().map(|s| s.caption.as_str()).collect();
    assert_eq!(caps, vec!["Un chat.", "Un chien."]);
    assert!(set.samples[1].image.ends_with("000000123456.jpg"));
    assert_eq!(set.skipped.len(), 2, "{:?}", set.skipped);
    assert!(set.skipped.iter().any(|s| s.contains("000000000007.jpg")));
    assert!(set.skipped.iter().any(|s| s.contains("`fr`")));

    let lines: String = records.as_array().unwrap().iter().map(|r| format!("{r}\n")).collect();
    let jl = dir.path().join("records.jsonl");
    std::fs::write(&jl, lines).unwrap();
    let set2 = load_captions(&jl, Some(dir.path()), "en").unwrap();
    assert_eq!(set2.samples.len(), 3);
    assert_eq!(set2.samples[2].caption, "No French.");

    // No usable record at all: one clear error.
    let err = load_captions(&arr, None, "de").unwrap_err().to_string();
    assert!(err.contains("no usable caption") && err.contains("--caption-field"), "{err}");
}

#[test]
fn data_order_is_a_function_of_the_position() {
    let mut a = DataOrder::new(10, 7);
    let all = a.positions(0, 30);
    let mut b = DataOrder::new(10, 7);
    assert_eq!(b.positions(13, 9), all[13..22].to_vec());
    let mut epoch0 = all[..10].to_vec();
    epoch0.sort();
    assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
    assert_ne!(all[..10], all[10..20]);
}

fn read_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "images"] {
        let d = dir.join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().filter(|e| e.path().is_file()).map(|e| e.path()).collect();
        names.sort();
        for p in names {
            out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn synthetic_set_is_deterministic_and_tokenizer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    vitgpt2::train::synth::write_set(&a, 12, 5, 64).unwrap();
    vitgpt2::train::synth::write_set(&b, 12, 5, 64).unwrap();
    vitgpt2::train::synth::write_set(&c, 12, 6, 64).unwrap();
    let ta = read_tree(&a);
    assert_eq!(ta.len(), 13);
    assert!(ta == read_tree(&b), "same seed, same bytes");
    assert!(ta != read_tree(&c), "another seed, another set");

    let set = load_captions(&a.join("captions.json"), None, "caption").unwrap();
    assert!(set.skipped.is_empty());
    assert_eq!(set.references().len(), 12);
    assert!(set.samples.len() > 12, "two-group scenes have two references");
    for r in set.references() {
        let img = vitgpt2::preprocess::load_image(&r.0).unwrap();
        assert_eq!(img.dimensions(), (64, 64));
    }

    // BPE trained on the synthetic captions: specials first, exact round trip.
    let caps: Vec<String> = set.samples.iter().map(|s| s.caption.clone()).collect();
    let tok_dir = dir.path().join("tok");
    vitgpt2::train::tokenizer::train_bpe(&caps, 320, &tok_dir).unwrap();
    let tok = CaptionTokenizer::from_dir(&tok_dir).unwrap();
    for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(i as u32));
    }
    assert!(tok.vocab_size() <= 320);
    for c in caps.iter().chain(["Une étoile à côté d'un œuf, 3 €".to_string()].iter()) {
        let ids = tok.encode(c).unwrap();
        assert!(ids.iter().all(|&i| i > 3), "no special or unknown token in {c}");
        assert_eq!(&tok.decode(&ids).unwrap(), c);
    }
    // Frequent words are merged: fewer tokens than bytes.
    let c = &caps[0];
    assert!(tok.encode(c).unwrap().len() < c.len() / 2, "{c}: {:?}", tok.encode(c).unwrap());
}
