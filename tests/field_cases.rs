//! Faults from public bug reports (issue #16; the cases are in shared/field-cases): each kind is
//! tested with the reported instance and more of the same kind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bundle_copy, fixtures};
use vitgpt2::preprocess::{decode_image, decode_image_limited, DecodeLimits};
use vitgpt2::runtime::{self, LoadOptions};

fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vitgpt2-node"))
}

/// CRC-32 (ISO-HDLC, as PNG chunks use it).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A PNG whose header declares `w`×`h` (1-bit grey, B2-05's form) followed by a few bytes of data:
/// a bomb is refused on its header, so the data never matters.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    out.extend(png_chunk(b"IEND", b""));
    out
}

/// A JPEG made of its start, a baseline frame header declaring `w`×`h`, and its end.
fn jpeg_bomb(w: u16, h: u16) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
    out
}

/// A GIF whose logical screen and single frame declare `w`×`h`.
fn gif_bomb(w: u16, h: u16) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&[0x00, 0, 0]);
    out.push(0x2C);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&[0x00, 0x02, 0x02, 0x4C, 0x01, 0x00, 0x3B]);
    out
}

/// A 24-bit BMP whose header declares `w`×`h` with almost no pixel data.
fn bmp_bomb(w: i32, h: i32) -> Vec<u8> {
    let mut out = b"BM".to_vec();
    out.extend_from_slice(&(54u32 + 16).to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&54u32.to_le_bytes());
    out.extend_from_slice(&40u32.to_le_bytes());
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&24u16.to_le_bytes());
    out.extend_from_slice(&[0; 24]);
    out.extend_from_slice(&[0; 16]);
    out
}

/// Decompression bombs of every format the node decodes are refused from their headers, at once
/// and without allocating the image (B2-05: a 194 KB PNG declaring 40000×40000 took 9.4 GB).
#[test]
fn size_bombs_are_refused_from_the_header() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("png 40000×40000 (B2-05)", png_bomb(40_000, 40_000)),
        ("png 60000×60000 (B2-05, short data)", png_bomb(60_000, 60_000)),
        ("png 10000×10000", png_bomb(10_000, 10_000)),
        ("jpeg 65000×65000", jpeg_bomb(65_000, 65_000)),
        ("jpeg 10000×9000", jpeg_bomb(10_000, 9_000)),
        ("gif 65535×65535", gif_bomb(65_535, 65_535)),
        ("bmp 50000×50000", bmp_bomb(50_000, 50_000)),
    ];
    for (what, bytes) in cases {
        let t = Instant::now();
        let err = decode_image(&bytes).err().unwrap_or_else(|| panic!("{what}: decoded")).to_string();
        assert!(err.contains("too large") && err.contains("limit"), "{what}: {err}");
        assert!(t.elapsed() < Duration::from_secs(1), "{what}: took {:?}", t.elapsed());
    }
    // The limits are settings: a small limit refuses an ordinary image, a large one lets it through.
    let png = std::fs::read(fixtures().join("images/street.jpg")).unwrap();
    let tight = DecodeLimits { max_pixels: 1000, ..DecodeLimits::default() };
    let err = decode_image_limited(&png, &tight).unwrap_err().to_string();
    assert!(err.contains("limit 1000 pixels"), "{err}");
    assert!(decode_image_limited(&png, &DecodeLimits::default()).is_ok());
}

/// On the command line a bomb is one error line for that image; the others are captioned and
/// the exit code is 1 (B2-05: the decoder panicked, exit 101, the rest never captioned).
#[test]
fn a_bomb_among_images_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb_40000.png");
    std::fs::write(&bomb, png_bomb(40_000, 40_000)).unwrap();
    let good = fixtures().join("images/street.jpg");
    let out = node().args(["caption", "--json", "--model"]).arg(fixtures().join("tiny-vit-gpt2")).arg(&bomb).arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines[0]["error"].as_str().unwrap().contains("too large (40000×40000 pixels"), "{:?}", lines[0]);
    assert!(lines[1]["caption"].is_string(), "the next image is captioned: {:?}", lines[1]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error: image")).count(), 1, "{stderr}");
}

fn jpeg_of(path: &Path) -> Vec<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

/// A complete JPEG followed by other bytes (a motion photo's video, a few junk bytes, a second
/// JPEG) decodes as PIL decodes it — the image up to its end marker — and captions exactly as
/// the plain file (B2-10); "truncated" only when the scan really stops early.
#[test]
fn data_after_the_jpeg_end_marker_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let plain = jpeg_of(&fixtures().join("images/street.jpg"));
    let mut trailer = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00isommp42".to_vec();
    trailer.extend(std::iter::repeat_n(0xABu8, 4000));
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("plain.jpg", plain.clone()),
        ("motion_photo.jpg", [plain.clone(), trailer].concat()),
        ("trailing_junk.jpg", [plain.clone(), b"\x01\x02\x03\xff\xd8\x00".to_vec()].concat()),
        ("two_jpegs.jpg", [plain.clone(), jpeg_of(&fixtures().join("images/gray.png"))].concat()),
        ("zero_padded.jpg", [plain.clone(), vec![0u8; 512]].concat()),
    ];
    let mut paths = Vec::new();
    for (name, bytes) in &files {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        paths.push(p);
    }
    let reference = decode_image(&plain).unwrap();
    for (name, bytes) in &files {
        assert_eq!(decode_image(bytes).unwrap(), reference, "{name}: pixels differ from the plain file's");
    }
    let cap = runtime::open(&fixtures().join("tiny-vit-gpt2"), &LoadOptions::default()).unwrap();
    let gen = cap.generation_config().clone();
    let want = cap.caption_file(&paths[0], &gen).unwrap();
    for p in &paths[1..] {
        let got = cap.caption_file(p, &gen).unwrap();
        assert_eq!((got.tokens, got.score), (want.tokens.clone(), want.score), "{}", p.display());
    }
    // Really truncated: the scan stops before the end marker (at several places).
    for keep in [plain.len() - 2, plain.len() / 2, 700] {
        let err = decode_image(&plain[..keep]).unwrap_err().to_string();
        assert!(err.contains("truncated JPEG"), "cut at {keep}: {err}");
    }
}

/// A stop id that is an ordinary token (B2-29: `eos_token_id: [355, 2]`): generation stops at it
/// and the caption keeps its text — the tokenizers library's `decode(ids, skip_special_tokens=True)`,
/// as transformers decodes.
#[test]
fn a_stop_token_that_is_not_special_keeps_its_text() {
    let dir = bundle_copy("tiny-vit-gpt2");
    let gen_path = dir.path().join("generation_config.json");
    let mut g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    g["eos_token_id"] = serde_json::json!([355, 2]);
    std::fs::write(&gen_path, g.to_string()).unwrap();
    let cap = runtime::open(dir.path(), &LoadOptions::default()).unwrap();
    let c = cap.caption_file(&fixtures().join("images/street.jpg"), cap.generation_config()).unwrap();
    assert_eq!(c.tokens.last(), Some(&355), "stops at the first stop id: {:?}", c.tokens);
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(c.caption, tok.decode(&c.tokens, true).unwrap());
    // The case's oracle (tokenizers 0.22.2 in Python, shared/field-cases/B2-29/oracle_decode.py).
    if c.tokens == [383, 278, 278, 278, 278, 278, 278, 278, 355] {
        assert_eq!(c.caption, " granlelelelelelelebe");
    }
}

/// The caption text of every reference case is the tokenizers library's decode of its tokens.
#[test]
fn captions_are_the_tokenizers_decode() {
    let cap = runtime::open(&fixtures().join("tiny-vit-gpt2"), &LoadOptions::default()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tiny-vit-gpt2/tokenizer.json")).unwrap();
    let images: Vec<PathBuf> = ["street.jpg", "gray.png", "wide.webp"].iter().map(|n| fixtures().join("images").join(n)).collect();
    for p in &images {
        let c = cap.caption_file(p, cap.generation_config()).unwrap();
        assert_eq!(c.caption, tok.decode(&c.tokens, true).unwrap(), "{}", p.display());
    }
}
