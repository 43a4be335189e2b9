//! Image preprocessing, identical to transformers' `load_image` + `ViTImageProcessor`:
//! EXIF orientation, RGB conversion as PIL's `convert("RGB")` does it, PIL's antialiased
//! bilinear resize (fixed-point, bit for bit), rescale, normalize, NCHW.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use ndarray::Array4;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// PIL resampling filters by their integer code in `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
}

/// `preprocessor_config.json` of a `ViTImageProcessor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PreprocessConfig {
    pub do_resize: bool,
    pub size: ImageSize,
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub do_convert_rgb: Option<bool>,
    pub image_processor_type: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        // The seed model's processor: 224x224 bilinear, x/255, mean 0.5, std 0.5.
        Self {
            do_resize: true,
            size: ImageSize { height: 224, width: 224 },
            resample: 2,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.5; 3],
            image_std: vec![0.5; 3],
            do_convert_rgb: None,
            image_processor_type: Some("ViTImageProcessor".into()),
        }
    }
}

impl PreprocessConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::bundle(path, format!("cannot read: {e}")))?;
        let cfg: PreprocessConfig = serde_json::from_str(&text)
            .map_err(|e| Error::bundle(path, format!("not a ViTImageProcessor config ({e})")))?;
        cfg.validate().map_err(|m| Error::bundle(path, m))?;
        Ok(cfg)
    }

    /// The settings this crate reproduces (a ViTImageProcessor, bilinear, 3 channels, non-zero
    /// std and size). Errors: [`Error::Invalid`] naming the field; callers add the file.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.image_processor_type {
            if !t.starts_with("ViTImageProcessor") {
                return Err(Error::Invalid(format!("image_processor_type is `{t}`, only ViTImageProcessor is supported")));
            }
        }
        self.resample_filter()?;
        if self.image_mean.len() != 3 || self.image_std.len() != 3 {
            return Err(Error::Invalid("image_mean and image_std need 3 values (R, G, B)".into()));
        }
        if self.image_std.contains(&0.0) {
            return Err(Error::Invalid("image_std has a zero".into()));
        }
        if self.size.height == 0 || self.size.width == 0 {
            return Err(Error::Invalid("size.height and size.width must be positive".into()));
        }
        Ok(())
    }

    /// The resize filter. Errors: [`Error::Invalid`] for any PIL filter but BILINEAR (2).
    pub fn resample_filter(&self) -> Result<Resample> {
        match self.resample {
            2 => Ok(Resample::Bilinear),
            other => Err(Error::Invalid(format!("resample = {other} is not supported (only 2, PIL BILINEAR, as ViT uses)"))),
        }
    }

    /// Pixel values `[1, 3, H, W]` for one RGB image.
    pub fn pixel_values(&self, img: &RgbImage) -> Array4<f32> {
        let resized;
        let img = if self.do_resize && (img.width() as usize, img.height() as usize) != (self.size.width, self.size.height) {
            resized = resize_bilinear(img, self.size.width as u32, self.size.height as u32);
            &resized
        } else {
            img
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = Array4::<f32>::zeros((1, 3, h, w));
        for (x, y, px) in img.enumerate_pixels() {
            for c in 0..3 {
                // transformers: rescale in float64 then cast to float32; normalize in float32.
                let mut v = if self.do_rescale {
                    (px.0[c] as f64 * self.rescale_factor) as f32
                } else {
                    px.0[c] as f32
                };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[[0, c, y as usize, x as usize]] = v;
            }
        }
        out
    }
}

/// Limits checked against an image's header before any large allocation, so that a small file
/// declaring a huge image (a "decompression bomb") is refused instead of exhausting memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeLimits {
    /// Most pixels (width × height) an image may have. Default 89,478,485: PIL's
    /// `Image.MAX_IMAGE_PIXELS` (its decompression-bomb warning threshold), i.e. 268 MB as 8-bit RGB.
    pub max_pixels: u64,
    /// Most bytes the decoder may allocate for one image (its own output format, e.g. 16-bit
    /// RGBA). Default 512 MiB (the `image` crate's default), which fits a 1–2 GB board.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: 89_478_485, max_alloc_bytes: 512 << 20 }
    }
}

impl DecodeLimits {
    /// Errors (one line) when a `width` × `height` image of `bytes_per_pixel` is over a limit.
    fn check(&self, width: u32, height: u32, bytes_per_pixel: u64) -> Result<()> {
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Err(Error::Invalid(format!(
                "too large ({width}×{height} pixels, limit {} pixels): refused before decoding (raise the image pixel limit if this image is genuine)",
                self.max_pixels
            )));
        }
        // The decoder's own buffer, then the 8-bit RGB copy.
        let bytes = pixels * bytes_per_pixel.max(3);
        if bytes > self.max_alloc_bytes {
            return Err(Error::Invalid(format!(
                "too large to decode ({width}×{height} pixels need {} MiB, limit {} MiB)",
                bytes >> 20,
                self.max_alloc_bytes >> 20
            )));
        }
        Ok(())
    }

    fn for_image_crate(&self) -> image::Limits {
        let mut l = image::Limits::default();
        l.max_alloc = Some(self.max_alloc_bytes);
        l
    }
}

/// [`load_image_limited`] with the default [`DecodeLimits`].
pub fn load_image(path: &Path) -> Result<RgbImage> {
    load_image_limited(path, &DecodeLimits::default())
}

/// Reads an image file as transformers' `load_image` does: EXIF orientation applied, then
/// converted to 8-bit RGB. Errors: [`Error::Image`] naming the file (unreadable, not an image,
/// truncated, corrupt, over `limits`).
pub fn load_image_limited(path: &Path, limits: &DecodeLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    decode_image_limited(&bytes, limits).map_err(|msg| Error::image(path, msg))
}

/// [`decode_image_limited`] with the default [`DecodeLimits`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_limited(bytes, &DecodeLimits::default())
}

/// Decodes an encoded image (JPEG, PNG, WebP, BMP, TIFF, GIF) from memory, as PIL does: a JPEG
/// stops at its end-of-image marker (data after it, e.g. a motion photo's video, is ignored) and
/// is "truncated" only when its data ends before that marker. The header is checked against
/// `limits` before anything large is allocated. Errors: [`Error::Invalid`], one line saying why
/// (not an image, truncated, corrupt, over `limits`); callers name the file or frame.
pub fn decode_image_limited(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Invalid(format!("cannot read: {e}")))?;
    let is_jpeg = match reader.format() {
        None => return Err(Error::Invalid("not a supported image (JPEG, PNG, WebP, BMP, TIFF or GIF)".into())),
        Some(f) => f == image::ImageFormat::Jpeg,
    };
    // The JPEG decoder fills a cut-off scan with grey; PIL refuses such files ("image file is
    // truncated"), and so do we: a half-written frame must not be captioned.
    let bytes = if is_jpeg {
        match jpeg_layout(bytes) {
            Some(JpegLayout { end, size }) => {
                if let Some((w, h)) = size {
                    limits.check(w, h, 3)?;
                }
                &bytes[..end]
            }
            None => return Err(Error::Invalid("truncated JPEG (its data ends before the end-of-image marker): the file is incomplete or still being written".into())),
        }
    } else {
        bytes
    };
    let mut decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Invalid(format!("cannot read: {e}")))?
        .into_decoder()
        .map_err(|e| Error::Invalid(format!("cannot decode: {e}")))?;
    let (w, h) = decoder.dimensions();
    limits.check(w, h, decoder.color_type().bytes_per_pixel() as u64)?;
    decoder.set_limits(limits.for_image_crate()).map_err(|e| Error::Invalid(format!("cannot decode: {e}")))?;
    // A broken EXIF block must not lose the picture: PIL ignores it too.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = match is_jpeg.then(|| decode_jpeg(bytes, limits)).flatten() {
        Some(jpeg) => DynamicImage::ImageRgb8(jpeg?),
        None => DynamicImage::from_decoder(decoder).map_err(|e| Error::Invalid(format!("cannot decode (corrupt or truncated?): {e}")))?,
    };
    img.apply_orientation(orientation);
    Ok(to_rgb_like_pil(img))
}

/// Decodes a JPEG with libjpeg-turbo's decoder (mozjpeg), as PIL does: same integer IDCT and
/// "fancy" chroma upsampling, hence the same pixels (other JPEG decoders differ by a few
/// levels). `None` for colour spaces libjpeg cannot turn into RGB (CMYK), left to `image`.
fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits) -> Option<Result<RgbImage>> {
    use mozjpeg::ColorSpace;
    // libjpeg reports errors by unwinding (without the panic hook); catch them here.
    let res = std::panic::catch_unwind(|| -> std::io::Result<Result<Option<RgbImage>>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK) {
            return Ok(Ok(None));
        }
        if let Err(e) = limits.check(d.width() as u32, d.height() as u32, 3) {
            return Ok(Err(e));
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let data: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok(Ok(RgbImage::from_raw(w, h, data)))
    });
    match res {
        Ok(Ok(Ok(Some(img)))) => Some(Ok(img)),
        Ok(Ok(Ok(None))) => None,
        Ok(Ok(Err(e))) => Some(Err(e)),
        Ok(Err(e)) => Some(Err(Error::Invalid(format!("cannot decode JPEG: {e}")))),
        Err(panic) => {
            let msg = panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "corrupt data".into());
            Some(Err(Error::Invalid(format!("cannot decode JPEG: {msg}"))))
        }
    }
}

/// What walking a JPEG's segments tells before decoding it.
struct JpegLayout {
    /// One past the end-of-image marker (FF D9): what follows is not part of the image.
    end: usize,
    /// Width and height from the frame header (SOFn), when it has them.
    size: Option<(u32, u32)>,
}

/// Walks a JPEG's segments (each header segment carries its length; entropy-coded scan data
/// runs until a marker other than byte stuffing FF 00 and the restart markers FF D0–D7) to its
/// end-of-image marker. `None` when the data ends before the marker: the file is truncated.
/// Embedded thumbnails (inside APP segments) and anything after the marker (a motion photo's
/// video, padding) are skipped, as libjpeg (PIL) stops at the marker too.
fn jpeg_layout(bytes: &[u8]) -> Option<JpegLayout> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return None;
    }
    let mut size = None;
    let mut i = 2;
    loop {
        // Markers may be preceded by fill bytes FF.
        while *bytes.get(i)? == 0xFF && *bytes.get(i + 1)? == 0xFF {
            i += 1;
        }
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = *bytes.get(i + 1)?;
        i += 2;
        match marker {
            0xD9 => return Some(JpegLayout { end: i, size }),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let len = u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?]) as usize;
        if len < 2 {
            return None;
        }
        // Start of frame (SOF0–SOF15 but DHT C4, JPG C8, DAC CC): precision, height, width.
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) && len >= 7 {
            let h = u16::from_be_bytes([*bytes.get(i + 3)?, *bytes.get(i + 4)?]) as u32;
            let w = u16::from_be_bytes([*bytes.get(i + 5)?, *bytes.get(i + 6)?]) as u32;
            size = Some((w, h));
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data: up to the next marker that is not stuffing or a restart.
            loop {
                let b = *bytes.get(i)?;
                if b == 0xFF {
                    let next = *bytes.get(i + 1)?;
                    if next == 0x00 || (0xD0..=0xD7).contains(&next) || next == 0xFF {
                        i += if next == 0xFF { 1 } else { 2 };
                        continue;
                    }
                    break;
                }
                i += 1;
            }
        }
    }
}

/// PIL's `convert("RGB")` as it applies to what PIL's decoders produce: alpha is dropped (not
/// composited), grey is replicated, 16-bit RGB(A) and grey+alpha keep their high byte (PIL
/// decodes them to 8 bits that way), and 16-bit grey (PIL mode `I;16`) is clipped to 255.
pub fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma16(g) => {
            let (w, h) = g.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = g.get_pixel(x, y).0[0].min(255) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageLumaA16(g) => {
            let (w, h) = g.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = (g.get_pixel(x, y).0[0] >> 8) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageRgb16(i) => {
            let (w, h) = i.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = i.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        DynamicImage::ImageRgba16(i) => {
            let (w, h) = i.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = i.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        // 8-bit grey, grey+alpha and RGBA: the image crate replicates grey and drops alpha,
        // exactly as PIL does.
        other => other.to_rgb8(),
    }
}

/// PIL's fixed-point precision for 8-bit resampling (`Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, number of taps; then the fixed-point taps.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    kk: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear (triangle) filter.
/// When downscaling, the filter support widens by the scale factor (antialiasing).
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let support_unit = 1.0f64; // bilinear filter support
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support_unit * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let w = if t.abs() < 1.0 { 1.0 - t.abs() } else { 0.0 };
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let w = if x < n && ww != 0.0 { k[x] / ww } else if x < n { k[x] } else { 0.0 };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, kk }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize(..., BILINEAR)` for 8-bit RGB (Pillow 13's `ImagingResampleInner`):
/// two separable passes, each rounded to 8 bits. Horizontal first over only the rows the
/// vertical pass reads, unless the height shrinks by more than twice as many pixels as the
/// width: then vertical first (Pillow 11.2+ does this for speed, and it changes the rounding).
pub fn resize_bilinear(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    let src = img.as_raw();
    let mut buf = src.to_vec();
    let (mut w, mut h) = (in_w, in_h);
    if horizontal_first {
        let vert = precompute_coeffs(in_h, out_h);
        if need_h {
            // Only the source rows that the vertical pass reads.
            let (first, last) = (vert.bounds[0].0, vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1);
            let horiz = precompute_coeffs(in_w, out_w);
            buf = horizontal_pass(&buf[first * w * 3..last * w * 3], w, last - first, out_w, &horiz);
            w = out_w;
            h = last - first;
            if need_v {
                buf = vertical_pass(&buf, w, out_h, &vert, first);
                h = out_h;
            }
        } else if need_v {
            buf = vertical_pass(&buf, w, out_h, &vert, 0);
            h = out_h;
        }
    } else {
        if need_v {
            buf = vertical_pass(&buf, w, out_h, &precompute_coeffs(in_h, out_h), 0);
            h = out_h;
        }
        if need_h {
            buf = horizontal_pass(&buf, w, h, out_w, &precompute_coeffs(in_w, out_w));
            w = out_w;
        }
    }
    debug_assert_eq!((w, h), (out_w, out_h));
    RgbImage::from_raw(w as u32, h as u32, buf).unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// Resamples each of `rows` rows of width `in_w` to width `out_w`.
fn horizontal_pass(src: &[u8], in_w: usize, rows: usize, out_w: usize, c: &Coeffs) -> Vec<u8> {
    let mut out = vec![0u8; rows * out_w * 3];
    for y in 0..rows {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
            for ch in 0..3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (x, kx) in k.iter().enumerate() {
                    ss += row[(x + xmin) * 3 + ch] as i32 * kx;
                }
                out[(y * out_w + xx) * 3 + ch] = clip8(ss);
            }
        }
    }
    out
}

/// Resamples columns of width `w` to `out_h` rows; `row0` is the source row that `src` starts at.
fn vertical_pass(src: &[u8], w: usize, out_h: usize, c: &Coeffs, row0: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * w * 3];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
        let ymin = ymin - row0;
        for xx in 0..w {
            for ch in 0..3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (y, ky) in k.iter().enumerate() {
                    ss += src[((y + ymin) * w + xx) * 3 + ch] as i32 * ky;
                }
                out[(yy * w + xx) * 3 + ch] = clip8(ss);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize_bilinear(&img, 5, 4), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 99]));
        let out = resize_bilinear(&img, 224, 224);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 99]));
        let out = resize_bilinear(&img, 8, 5);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 99]));
    }
}
