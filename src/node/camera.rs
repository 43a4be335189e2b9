//! Where frames come from: one [`FrameSource`] trait for the V4L2 camera (cargo feature
//! `camera`), a watched directory ([`super::watch`]), a list of files and a synthetic pattern;
//! plus the MJPEG/YUYV to RGB conversion the camera uses (tested with recorded buffers).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;

pub use super::watch::DirectorySource;
use crate::error::{Error, Result};
use crate::node::config::{PixelFormat, SourceKind, SourceSection};

/// What a source has to say when asked for a frame.
pub enum SourceEvent {
    /// A frame and where it came from (file name, `camera:0`, `synthetic`).
    Frame { image: RgbImage, origin: String },
    /// A frame that could not be read or decoded: counted, logged, skipped.
    Bad { origin: String, error: Error },
    /// Nothing new yet; ask again after a short wait.
    Idle,
    /// The device is missing, busy or unplugged: retried with backoff by the caller.
    Unavailable(Error),
    /// No more frames, ever (a finite file list).
    End,
}

/// A source of frames, polled by the capture thread.
pub trait FrameSource: Send {
    /// Blocks at most about `wait` for the next event.
    fn next(&mut self, wait: Duration) -> SourceEvent;
    /// Live sources (cameras, synthetic) drop stale frames; file sources must not lose any,
    /// so capture waits for the captioner instead.
    fn live(&self) -> bool;
    /// One line for the log.
    fn describe(&self) -> String;
}

/// Builds the source the configuration asks for.
///
/// Errors: [`Error::Source`] (no folder to watch, a pattern matching no file, no camera
/// support in this build).
pub fn open(cfg: &SourceSection) -> Result<Box<dyn FrameSource>> {
    Ok(match cfg.kind {
        SourceKind::Directory => {
            let dir = cfg.path.clone().ok_or_else(|| Error::source("source.path: missing"))?;
            Box::new(DirectorySource::new(dir, cfg.existing, Duration::from_millis(cfg.poll_ms)).settle(Duration::from_millis(cfg.settle_ms)))
        }
        SourceKind::Files => Box::new(FilesSource::new(&cfg.files, cfg.repeat, cfg.rate)?),
        SourceKind::Synthetic => Box::new(SyntheticSource::new(cfg.width, cfg.height, cfg.count, cfg.rate)),
        #[cfg(feature = "camera")]
        SourceKind::Camera => Box::new(v4l::CameraSource::new(cfg)),
        #[cfg(not(feature = "camera"))]
        SourceKind::Camera => return Err(Error::source("source.kind = \"camera\": this build has no camera support (cargo feature `camera`)")),
    })
}

/// For `check-config --strict`: opens the camera and starts streaming once, then lets it go.
/// Returns the mode the driver chose.
///
/// Errors: [`Error::Source`] naming the device and the problem (missing, busy, no
/// permission: the user must be in the `video` group).
#[cfg(feature = "camera")]
pub fn probe_camera(cfg: &SourceSection) -> Result<String> {
    v4l::CameraSource::new(cfg).probe()
}

#[cfg(not(feature = "camera"))]
pub fn probe_camera(_cfg: &SourceSection) -> Result<String> {
    Err(Error::source("this build has no camera support (cargo feature `camera`)"))
}

const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif"];

/// Whether a file name has an image extension (the watched folder ignores other files).
pub fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads and decodes one image file (EXIF orientation applied, as for `caption`).
pub fn read_frame(path: &Path) -> SourceEvent {
    super::fault("frame");
    let origin = path.display().to_string();
    match crate::preprocess::load_image(path) {
        Ok(image) => SourceEvent::Frame { image, origin },
        Err(error) => SourceEvent::Bad { origin, error },
    }
}

/// Files given by path or glob, in order, at `rate` frames per second.
pub struct FilesSource {
    files: Vec<PathBuf>,
    at: usize,
    repeat: bool,
    period: Duration,
    last: Option<Instant>,
}

impl FilesSource {
    /// Errors: [`Error::Source`] for a bad pattern or one that matches no file.
    pub fn new(patterns: &[String], repeat: bool, rate: f64) -> Result<Self> {
        let mut files = Vec::new();
        for pat in patterns {
            let matches: Vec<PathBuf> = glob::glob(pat)
                .map_err(|e| Error::source(format!("source.files: bad pattern `{pat}`: {e}")))?
                .flatten()
                .filter(|p| p.is_file())
                .collect();
            if matches.is_empty() {
                return Err(Error::source(format!("source.files: `{pat}` matches no file")));
            }
            files.extend(matches);
        }
        Ok(FilesSource { files, at: 0, repeat, period: Duration::from_secs_f64(1.0 / rate), last: None })
    }
}

impl FrameSource for FilesSource {
    fn next(&mut self, _wait: Duration) -> SourceEvent {
        if self.at >= self.files.len() {
            if !self.repeat || self.files.is_empty() {
                return SourceEvent::End;
            }
            self.at = 0;
        }
        pace(&mut self.last, self.period);
        self.at += 1;
        read_frame(&self.files[self.at - 1])
    }
    fn live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        format!("{} file(s){}", self.files.len(), if self.repeat { ", looped" } else { "" })
    }
}

/// Sleeps until `period` after the previous frame, then marks this one's time.
fn pace(last: &mut Option<Instant>, period: Duration) {
    if let Some(due) = last.map(|t| t + period) {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
    *last = Some(Instant::now());
}

/// A moving gradient, for tests and demos without any image.
pub struct SyntheticSource {
    width: u32,
    height: u32,
    count: u64,
    made: u64,
    period: Duration,
    last: Option<Instant>,
}

impl SyntheticSource {
    pub fn new(width: u32, height: u32, count: u64, rate: f64) -> Self {
        SyntheticSource { width, height, count, made: 0, period: Duration::from_secs_f64(1.0 / rate), last: None }
    }
}

impl FrameSource for SyntheticSource {
    fn next(&mut self, _wait: Duration) -> SourceEvent {
        if self.count > 0 && self.made >= self.count {
            return SourceEvent::End;
        }
        pace(&mut self.last, self.period);
        let k = self.made as u32;
        self.made += 1;
        let image = RgbImage::from_fn(self.width, self.height, |x, y| {
            image::Rgb([((x + 7 * k) % 256) as u8, ((y + 3 * k) % 256) as u8, ((x + y + 11 * k) % 256) as u8])
        });
        SourceEvent::Frame { image, origin: "synthetic".into() }
    }
    fn live(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        format!("synthetic {}x{}", self.width, self.height)
    }
}

/// A camera frame as the driver hands it over. Errors: [`Error::Frame`].
pub fn frame_to_rgb(format: PixelFormat, width: u32, height: u32, data: &[u8]) -> Result<RgbImage> {
    super::fault("frame");
    match format {
        PixelFormat::Mjpeg => mjpeg_to_rgb(data),
        PixelFormat::Yuyv => yuyv_to_rgb(width, height, data),
    }
}

/// MJPEG frames are plain JPEGs; decoded exactly as image files are, so the camera and the
/// file path give the model the same pixels.
pub fn mjpeg_to_rgb(data: &[u8]) -> Result<RgbImage> {
    crate::preprocess::decode_image(data).map_err(|e| Error::frame("MJPEG frame", e))
}

/// YUYV 4:2:2 (Y0 U Y1 V per two pixels), BT.601 limited range as V4L2 webcams send it.
pub fn yuyv_to_rgb(width: u32, height: u32, data: &[u8]) -> Result<RgbImage> {
    let what = || format!("YUYV frame {width}x{height}");
    if width == 0 || height == 0 || !width.is_multiple_of(2) {
        return Err(Error::frame(what(), "width must be even and non-zero"));
    }
    let need = width as usize * height as usize * 2;
    if data.len() < need {
        return Err(Error::frame(what(), format!("{} bytes, expected {need}", data.len())));
    }
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for px in data[..need].chunks_exact(4) {
        let (y0, u, y1, v) = (px[0], px[1], px[2], px[3]);
        out.extend_from_slice(&yuv_to_rgb(y0, u, v));
        out.extend_from_slice(&yuv_to_rgb(y1, u, v));
    }
    RgbImage::from_raw(width, height, out).ok_or_else(|| Error::frame(what(), "size mismatch"))
}

/// One pixel, integer BT.601 (the usual fixed-point form, within 1 of the float formula).
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = y as i32 - 16;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clip = |x: i32| x.clamp(0, 255) as u8;
    [clip((298 * c + 409 * e + 128) >> 8), clip((298 * c - 100 * d - 208 * e + 128) >> 8), clip((298 * c + 516 * d + 128) >> 8)]
}

/// The change gate: mean absolute difference (0..1) between two frames, on 32x32 grey
/// thumbnails so it costs nothing next to a caption and ignores sensor noise.
pub fn difference(a: &Thumb, b: &Thumb) -> f64 {
    let sum: u64 = a.0.iter().zip(b.0.iter()).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / (a.0.len().max(1) as f64 * 255.0)
}

/// Grey levels of a [`thumbnail`], row by row.
#[derive(Clone)]
pub struct Thumb(Vec<u8>);

/// A 32x32 grey thumbnail of a frame, for the change gate ([`difference`]).
pub fn thumbnail(img: &RgbImage) -> Thumb {
    const N: u32 = 32;
    let (w, h) = img.dimensions();
    let mut out = Vec::with_capacity((N * N) as usize);
    for ty in 0..N {
        for tx in 0..N {
            let (x0, x1) = (tx * w / N, ((tx + 1) * w / N).max(tx * w / N + 1).min(w));
            let (y0, y1) = (ty * h / N, ((ty + 1) * h / N).max(ty * h / N + 1).min(h));
            let (mut s, mut n) = (0u64, 0u64);
            // Sample a 4x4 grid of each cell: enough for a gate, cheap on big frames.
            for y in (y0..y1).step_by(((y1 - y0) / 4).max(1) as usize) {
                for x in (x0..x1).step_by(((x1 - x0) / 4).max(1) as usize) {
                    let p = img.get_pixel(x, y).0;
                    s += (p[0] as u64 * 299 + p[1] as u64 * 587 + p[2] as u64 * 114) / 1000;
                    n += 1;
                }
            }
            out.push((s / n.max(1)) as u8);
        }
    }
    Thumb(out)
}

#[cfg(feature = "camera")]
mod v4l {
    //! The V4L2 camera through nokhwa; opened lazily and reopened after errors, so a missing,
    //! busy or unplugged camera never stops the daemon.
    use super::*;
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution};
    use nokhwa::Camera;

    pub struct CameraSource {
        index: u32,
        want: CameraFormat,
        format: PixelFormat,
        cam: Option<Camera>,
    }

    // nokhwa's Camera holds raw V4L2 handles; it is only ever used from the capture thread.
    unsafe impl Send for CameraSource {}

    impl CameraSource {
        pub fn new(cfg: &SourceSection) -> Self {
            let ff = match cfg.format {
                PixelFormat::Mjpeg => FrameFormat::MJPEG,
                PixelFormat::Yuyv => FrameFormat::YUYV,
            };
            CameraSource {
                index: cfg.device,
                want: CameraFormat::new(Resolution::new(cfg.width, cfg.height), ff, cfg.fps),
                format: cfg.format,
                cam: None,
            }
        }

        fn open(&mut self) -> Result<()> {
            let req = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(self.want));
            let dev = format!("/dev/video{}", self.index);
            let mut cam = Camera::new(CameraIndex::Index(self.index), req).map_err(|e| Error::source(format!("camera {}: cannot open {dev}: {e}{}", self.index, hint(&dev))))?;
            cam.open_stream().map_err(|e| Error::source(format!("camera {}: cannot start streaming: {e}", self.index)))?;
            let got = cam.camera_format();
            tracing::info!(camera = self.index, wanted = %self.want, chosen = %got, "camera mode chosen (closest supported)");
            self.format = match got.format() {
                FrameFormat::YUYV => PixelFormat::Yuyv,
                _ => PixelFormat::Mjpeg,
            };
            self.cam = Some(cam);
            Ok(())
        }

        /// Opens the camera, reads one frame and closes it; returns the chosen mode.
        pub fn probe(mut self) -> Result<String> {
            self.open()?;
            let cam = self.cam.as_mut().ok_or_else(|| Error::source("camera: not opened"))?;
            let mode = cam.camera_format().to_string();
            cam.frame().map_err(|e| Error::source(format!("camera {}: opened ({mode}) but no frame came: {e}", self.index)))?;
            let _ = cam.stop_stream();
            Ok(mode)
        }
    }

    /// The usual reason a device cannot be opened, when it can be told.
    fn hint(dev: &str) -> String {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(dev) {
            Err(_) => format!(" ({dev} does not exist: is the camera plugged in? `ls /dev/video*` lists the devices)"),
            Ok(m) if std::fs::File::open(dev).is_err() => {
                format!(" (no permission on {dev}, group id {}: run the daemon in the `video` group)", m.gid())
            }
            Ok(_) => String::new(),
        }
    }

    impl FrameSource for CameraSource {
        fn next(&mut self, _wait: Duration) -> SourceEvent {
            if self.cam.is_none() {
                if let Err(e) = self.open() {
                    return SourceEvent::Unavailable(e);
                }
            }
            let Some(cam) = self.cam.as_mut() else { return SourceEvent::Idle };
            match cam.frame() {
                Ok(buf) => {
                    let res = buf.resolution();
                    let origin = format!("camera:{}", self.index);
                    match frame_to_rgb(self.format, res.width(), res.height(), buf.buffer()) {
                        Ok(image) => SourceEvent::Frame { image, origin },
                        Err(error) => SourceEvent::Bad { origin, error },
                    }
                }
                Err(e) => {
                    // Unplugged or wedged: drop the handle and reopen with backoff.
                    self.cam = None;
                    SourceEvent::Unavailable(Error::source(format!("camera {}: capture failed: {e}", self.index)))
                }
            }
        }
        fn live(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            format!("camera /dev/video{} ({})", self.index, self.want)
        }
    }
}
