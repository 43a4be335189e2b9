//! The end-of-training plot (PNG, drawn with `image`, no plotting crate): top panel, training
//! loss (blue) and validation loss (red) against the step; bottom panel, validation BLEU-4
//! (green), ROUGE-L (grey), CIDEr-D / 10 (orange) and exact match (purple), from 0 to 1.
//! Axis ticks are labelled with a 3×5 digit font.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

const W: u32 = 900;
const H: u32 = 640;
const LEFT: i64 = 60;
const RIGHT: i64 = 20;

const DIGITS: [[u8; 5]; 12] = [
    [0b111, 0b101, 0b101, 0b101, 0b111], // 0
    [0b010, 0b110, 0b010, 0b010, 0b111], // 1
    [0b111, 0b001, 0b111, 0b100, 0b111], // 2
    [0b111, 0b001, 0b111, 0b001, 0b111], // 3
    [0b101, 0b101, 0b111, 0b001, 0b001], // 4
    [0b111, 0b100, 0b111, 0b001, 0b111], // 5
    [0b111, 0b100, 0b111, 0b101, 0b111], // 6
    [0b111, 0b001, 0b010, 0b010, 0b010], // 7
    [0b111, 0b101, 0b111, 0b101, 0b111], // 8
    [0b111, 0b101, 0b111, 0b001, 0b111], // 9
    [0b000, 0b000, 0b000, 0b000, 0b010], // .
    [0b000, 0b000, 0b111, 0b000, 0b000], // -
];

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64) {
    let mut cx = x;
    for ch in s.chars() {
        let g = match ch {
            '0'..='9' => DIGITS[ch as usize - '0' as usize],
            '.' => DIGITS[10],
            '-' => DIGITS[11],
            _ => {
                cx += 4 * scale;
                continue;
            }
        };
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, cx + col * scale + dx, y + row as i64 * scale + dy, [60, 60, 60]);
                        }
                    }
                }
            }
        }
        cx += 4 * scale;
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            put(img, x + dx, y + dy, c);
        }
    }
}

struct Panel {
    top: i64,
    bottom: i64,
    ymin: f64,
    ymax: f64,
    xmax: f64,
}

impl Panel {
    fn map(&self, x: f64, y: f64) -> (f64, f64) {
        let px = LEFT as f64 + x / self.xmax.max(1.0) * (W as i64 - LEFT - RIGHT) as f64;
        let frac = ((y - self.ymin) / (self.ymax - self.ymin).max(1e-12)).clamp(0.0, 1.0);
        (px, self.bottom as f64 - frac * (self.bottom - self.top) as f64)
    }

    fn frame(&self, img: &mut RgbImage) {
        for k in 0..=4 {
            let y = self.ymin + (self.ymax - self.ymin) * k as f64 / 4.0;
            let (_, py) = self.map(0.0, y);
            for x in LEFT..(W as i64 - RIGHT) {
                put(img, x, py as i64, if k == 0 { [0, 0, 0] } else { [225, 225, 225] });
            }
            text(img, 4, py as i64 - 5, &format!("{y:.2}"), 2);
        }
        for k in 0..=5 {
            let x = self.xmax * k as f64 / 5.0;
            let (px, _) = self.map(x, 0.0);
            for y in self.top..=self.bottom {
                put(img, px as i64, y, if k == 0 { [0, 0, 0] } else { [225, 225, 225] });
            }
            text(img, px as i64 - 8, self.bottom + 6, &format!("{}", x.round() as u64), 2);
        }
    }

    fn series(&self, img: &mut RgbImage, pts: &[(f64, f64)], c: [u8; 3]) {
        for w in pts.windows(2) {
            line(img, self.map(w[0].0, w[0].1), self.map(w[1].0, w[1].1), c);
        }
        for &(x, y) in pts {
            let (px, py) = self.map(x, y);
            for dy in -2..=2 {
                for dx in -2..=2 {
                    if pts.len() < 60 {
                        put(img, px as i64 + dx, py as i64 + dy, c);
                    }
                }
            }
        }
    }
}

/// Plots the JSON-lines training log at `log` into `png`.
pub fn plot_log(log: &Path, png: &Path) -> Result<()> {
    let text_log = std::fs::read_to_string(log).map_err(|e| Error::setting("log", format!("{}: {e}", log.display())))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut metrics: [Vec<(f64, f64)>; 4] = Default::default();
    for l in text_log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let step = v.get("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        let get = |k: &str| v.get(k).and_then(|x| x.as_f64());
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("train") => train.extend(get("loss").map(|y| (step, y))),
            Some("eval") => {
                val.extend(get("val_loss").filter(|y| y.is_finite()).map(|y| (step, y)));
                for (i, (k, s)) in [("bleu4", 1.0), ("rouge_l", 1.0), ("cider_d", 0.1), ("exact", 1.0)].iter().enumerate() {
                    metrics[i].extend(get(k).map(|y| (step, y * s)));
                }
            }
            _ => {}
        }
    }
    if train.is_empty() {
        return Err(Error::setting("log", format!("{}: no training loss to plot", log.display())));
    }
    let xmax = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let ymax = train.iter().chain(&val).map(|p| p.1).fold(0.0, f64::max);
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let top = Panel { top: 20, bottom: 290, ymin: 0.0, ymax: ymax.max(1e-3), xmax };
    top.frame(&mut img);
    top.series(&mut img, &train, [40, 90, 200]);
    top.series(&mut img, &val, [210, 40, 40]);
    let bottom = Panel { top: 340, bottom: 610, ymin: 0.0, ymax: 1.0, xmax };
    bottom.frame(&mut img);
    for (pts, c) in metrics.iter().zip([[30, 150, 50], [130, 130, 130], [240, 140, 20], [140, 50, 170]]) {
        bottom.series(&mut img, pts, c);
    }
    img.save(png).map_err(|e| Error::setting("plot", format!("cannot write {}: {e}", png.display())))
}
