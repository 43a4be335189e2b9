//! Frame sources and the camera's frame conversion. No virtual V4L2 device exists on these
//! machines, so the camera path is tested through its conversion of recorded-style MJPEG and
//! YUYV buffers (generated here, with known colours).

use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use vitgpt2::node::camera::{self, FrameSource, SourceEvent};
use vitgpt2::node::config::PixelFormat;

fn close(a: [u8; 3], b: [u8; 3], tol: u8) -> bool {
    a.iter().zip(b.iter()).all(|(x, y)| x.abs_diff(*y) <= tol)
}

/// BT.601 limited-range (Y, U, V) of a few colours, as a webcam would send them.
const YUV: [([u8; 3], [u8; 3]); 5] = [
    ([235, 128, 128], [255, 255, 255]),
    ([16, 128, 128], [0, 0, 0]),
    ([81, 90, 240], [255, 0, 0]),
    ([145, 54, 34], [0, 255, 0]),
    ([41, 240, 110], [0, 0, 255]),
];

#[test]
fn yuyv_buffer_to_rgb() {
    // A 10x2 frame: each colour takes two pixels (one YUYV macropixel) on both rows.
    let (w, h) = (10u32, 2u32);
    let mut buf = Vec::new();
    for _ in 0..h {
        for (yuv, _) in YUV {
            buf.extend_from_slice(&[yuv[0], yuv[1], yuv[0], yuv[2]]);
        }
    }
    let img = camera::frame_to_rgb(PixelFormat::Yuyv, w, h, &buf).unwrap();
    assert_eq!(img.dimensions(), (w, h));
    for (i, (_, rgb)) in YUV.iter().enumerate() {
        for x in [2 * i as u32, 2 * i as u32 + 1] {
            for y in 0..h {
                let got = img.get_pixel(x, y).0;
                assert!(close(got, *rgb, 3), "pixel ({x},{y}): {got:?}, expected {rgb:?}");
            }
        }
    }
    // Two different lumas in one macropixel share the chroma.
    let px = camera::yuyv_to_rgb(2, 1, &[16, 128, 235, 128]).unwrap();
    assert_eq!(px.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(px.get_pixel(1, 0).0, [255, 255, 255]);
}

#[test]
fn bad_yuyv_buffers_are_errors() {
    assert!(camera::yuyv_to_rgb(3, 2, &[0; 12]).unwrap_err().to_string().contains("even"));
    assert!(camera::yuyv_to_rgb(4, 2, &[0; 15]).unwrap_err().to_string().contains("expected 16"));
    assert!(camera::yuyv_to_rgb(0, 2, &[]).is_err());
    // Drivers may pad the buffer: extra bytes are ignored.
    assert!(camera::yuyv_to_rgb(2, 1, &[16, 128, 16, 128, 0, 0]).is_ok());
}

fn test_pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(img).unwrap();
    out
}

#[test]
fn mjpeg_buffer_to_rgb_matches_file_decoding() {
    let src = test_pattern(64, 48);
    let frame = jpeg(&src);
    let img = camera::frame_to_rgb(PixelFormat::Mjpeg, 64, 48, &frame).unwrap();
    assert_eq!(img.dimensions(), (64, 48));
    // The camera path gives the model exactly the pixels the file path would.
    assert_eq!(img, vitgpt2::preprocess::decode_image(&frame).unwrap());
    let worst = img.pixels().zip(src.pixels()).map(|(a, b)| a.0.iter().zip(b.0.iter()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()).max().unwrap();
    assert!(worst < 24, "JPEG error too large: {worst}");
}

#[test]
fn corrupt_mjpeg_is_an_error() {
    let frame = jpeg(&test_pattern(32, 32));
    let err = camera::mjpeg_to_rgb(&frame[..frame.len() / 3]).unwrap_err().to_string();
    assert!(err.starts_with("MJPEG frame"), "{err}");
    assert!(camera::mjpeg_to_rgb(b"not a jpeg").is_err());
}

fn next_event(src: &mut dyn FrameSource, timeout: Duration) -> SourceEvent {
    let end = Instant::now() + timeout;
    loop {
        match src.next(Duration::from_millis(20)) {
            SourceEvent::Idle if Instant::now() < end => continue,
            ev => return ev,
        }
    }
}

#[test]
fn directory_source_takes_each_new_image_once_in_order_and_skips_corrupt_ones() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_pattern(16, 16);
    img.save(dir.path().join("b.png")).unwrap();
    img.save(dir.path().join("a.png")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image, ignored").unwrap();
    let mut src = camera::DirectorySource::new(dir.path().to_path_buf(), true, Duration::from_millis(30));
    assert!(!src.live());
    let mut names = Vec::new();
    for _ in 0..2 {
        match next_event(&mut src, Duration::from_secs(3)) {
            SourceEvent::Frame { origin, image } => {
                assert_eq!(image.dimensions(), (16, 16));
                names.push(origin.rsplit('/').next().unwrap().to_string());
            }
            _ => panic!("expected a frame"),
        }
    }
    assert_eq!(names, ["a.png", "b.png"]);
    std::fs::write(dir.path().join("c.jpg"), b"\xff\xd8\xff garbage").unwrap();
    img.save(dir.path().join("d.png")).unwrap();
    match next_event(&mut src, Duration::from_secs(3)) {
        SourceEvent::Bad { origin, error } => assert!(origin.ends_with("c.jpg") && !error.to_string().is_empty()),
        _ => panic!("expected the corrupt image to be reported"),
    }
    match next_event(&mut src, Duration::from_secs(3)) {
        SourceEvent::Frame { origin, .. } => assert!(origin.ends_with("d.png")),
        _ => panic!("expected d.png"),
    }
    // Nothing is taken twice.
    assert!(matches!(next_event(&mut src, Duration::from_millis(300)), SourceEvent::Idle));
}

#[test]
fn directory_source_can_ignore_existing_images() {
    let dir = tempfile::tempdir().unwrap();
    test_pattern(8, 8).save(dir.path().join("old.png")).unwrap();
    let mut src = camera::DirectorySource::new(dir.path().to_path_buf(), false, Duration::from_millis(30));
    assert!(matches!(next_event(&mut src, Duration::from_millis(300)), SourceEvent::Idle));
    test_pattern(8, 8).save(dir.path().join("new.png")).unwrap();
    assert!(matches!(next_event(&mut src, Duration::from_secs(3)), SourceEvent::Frame { origin, .. } if origin.ends_with("new.png")));
}

#[test]
fn files_source_expands_globs_in_order_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["2.png", "1.png", "3.png"] {
        test_pattern(8, 8).save(dir.path().join(n)).unwrap();
    }
    let pat = format!("{}/*.png", dir.path().display());
    let mut src = camera::FilesSource::new(std::slice::from_ref(&pat), false, 1000.0).unwrap();
    let mut got = Vec::new();
    loop {
        match src.next(Duration::ZERO) {
            SourceEvent::Frame { origin, .. } => got.push(origin.rsplit('/').next().unwrap().to_string()),
            SourceEvent::End => break,
            _ => panic!("unexpected event"),
        }
    }
    assert_eq!(got, ["1.png", "2.png", "3.png"]);
    let err = camera::FilesSource::new(&[format!("{}/*.jpg", dir.path().display())], false, 1.0).err().unwrap().to_string();
    assert!(err.contains("matches no file"), "{err}");
}

#[test]
fn synthetic_source_and_change_gate() {
    let mut src = camera::SyntheticSource::new(64, 48, 3, 1000.0);
    assert!(src.live());
    let mut frames = Vec::new();
    while let SourceEvent::Frame { image, .. } = src.next(Duration::ZERO) {
        frames.push(image);
    }
    assert_eq!(frames.len(), 3);
    let t0 = camera::thumbnail(&frames[0]);
    assert_eq!(camera::difference(&t0, &camera::thumbnail(&frames[0])), 0.0);
    assert!(camera::difference(&t0, &camera::thumbnail(&frames[2])) > 0.01);
    let black = camera::thumbnail(&RgbImage::new(64, 48));
    let white = camera::thumbnail(&RgbImage::from_pixel(64, 48, Rgb([255, 255, 255])));
    assert!((camera::difference(&black, &white) - 1.0).abs() < 1e-9);
}

/// Writes `bytes` to `path` in two halves with a pause between them, as a network copy or a
/// camera flushing in bursts does (B2-22).
fn write_in_two_halves(path: &std::path::Path, bytes: &[u8], pause: Duration) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(pause);
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
}

/// Every event of `src` over `d`, Idle left out.
fn events_for(src: &mut dyn FrameSource, d: Duration) -> Vec<(String, bool)> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    while Instant::now() < end {
        match src.next(Duration::from_millis(20)) {
            SourceEvent::Frame { origin, .. } => out.push((origin.rsplit('/').next().unwrap().to_string(), true)),
            SourceEvent::Bad { origin, .. } => out.push((origin.rsplit('/').next().unwrap().to_string(), false)),
            _ => {}
        }
    }
    out
}

#[test]
fn watched_folder_takes_files_once_complete_and_retries_one_read_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = std::fs::read(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/street.jpg")).unwrap();
    let mut png = Vec::new();
    test_pattern(64, 48).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let settle = Duration::from_millis(400);
    let mut src = camera::DirectorySource::new(dir.path().to_path_buf(), true, Duration::from_millis(30)).settle(settle);

    // A writer pausing for less than the settle time: never read half-written.
    let (d, p) = (dir.path().to_path_buf(), png.clone());
    let writer = std::thread::spawn(move || write_in_two_halves(&d.join("a_short_pause.png"), &p, Duration::from_millis(200)));
    let got = events_for(&mut src, Duration::from_millis(1500));
    writer.join().unwrap();
    assert_eq!(got, [("a_short_pause.png".to_string(), true)]);

    // A writer pausing for longer (1.5 s, as in B2-22): read half-written once (one warning),
    // taken again when it changes, captioned once.
    for (name, bytes) in [("b_slow.jpg", &jpg), ("c_slow.png", &png)] {
        let (d, b) = (dir.path().join(name), bytes.clone());
        let writer = std::thread::spawn(move || write_in_two_halves(&d, &b, Duration::from_millis(1500)));
        let got = events_for(&mut src, Duration::from_millis(3000));
        writer.join().unwrap();
        assert_eq!(got, [(name.to_string(), false), (name.to_string(), true)], "{name}");
    }

    // A file that stays broken: one warning, never read again.
    std::fs::write(dir.path().join("d_broken.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    assert_eq!(events_for(&mut src, Duration::from_millis(1500)), [("d_broken.jpg".to_string(), false)]);
    // A complete file written in one go, and nothing taken twice.
    std::fs::write(dir.path().join("e_fast.jpg"), &jpg).unwrap();
    assert_eq!(events_for(&mut src, Duration::from_millis(1500)), [("e_fast.jpg".to_string(), true)]);
}
