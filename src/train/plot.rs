//! The end-of-training plot (PNG, drawn with plotters): top panel, training and validation loss
//! against the step; bottom panel, validation BLEU-4, ROUGE-L, CIDEr-D / 10 and exact match.
//! Text is set in DejaVu Sans, embedded in the binary (plotters finds no system font on a
//! headless box).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

const W: u32 = 960;
const H: u32 = 720;
const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

/// The series read from a JSON-lines training log.
#[derive(Default)]
struct Curves {
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    /// BLEU-4, ROUGE-L, CIDEr-D / 10, exact match.
    metrics: [Vec<(f64, f64)>; 4],
}

fn read_log(text: &str) -> Curves {
    let mut c = Curves::default();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let step = v.get("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|y| y.is_finite());
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("train") => c.train.extend(get("loss").map(|y| (step, y))),
            Some("eval") => {
                c.val.extend(get("val_loss").map(|y| (step, y)));
                for (i, (k, s)) in [("bleu4", 1.0), ("rouge_l", 1.0), ("cider_d", 0.1), ("exact", 1.0)].iter().enumerate() {
                    c.metrics[i].extend(get(k).map(|y| (step, y * s)));
                }
            }
            _ => {}
        }
    }
    c
}

/// One panel's frame: title, margins, room for the axis labels (its y axis is the caller's).
fn panel<'a, 'b>(area: &'a DrawingArea<BitMapBackend<'b>, Shift>, title: &str) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 18)).margin(10).margin_right(30).x_label_area_size(30).y_label_area_size(60);
    b
}

fn draw(c: &Curves, buf: &mut [u8]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(H / 2);
    let xmax = c.train.iter().chain(&c.val).map(|p| p.0).fold(1.0, f64::max);
    let ys = || c.train.iter().chain(&c.val).map(|p| p.1).filter(|&y| y > 0.0);
    let ymax = ys().fold(1e-3, f64::max);
    let ymin = ys().fold(ymax, f64::min);

    // Log scale: the loss falls by two orders of magnitude and the late steps matter most.
    let mut loss = panel(&top, "training and validation loss").build_cartesian_2d(0.0..xmax, (ymin * 0.9..ymax * 1.1).log_scale())?;
    loss.configure_mesh().x_desc("step").y_desc("loss (log scale)").x_label_formatter(&|x| format!("{x:.0}")).label_style(("sans-serif", 13)).draw()?;
    let blue = RGBColor(40, 90, 200);
    let red = RGBColor(210, 40, 40);
    loss.draw_series(LineSeries::new(c.train.iter().copied(), &blue))?.label("training").legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue));
    loss.draw_series(LineSeries::new(c.val.iter().copied(), red.stroke_width(2)))?.label("validation").legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red));
    loss.draw_series(c.val.iter().map(|&p| Circle::new(p, 3, red.filled())))?;
    loss.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 13)).draw()?;

    let mut m = panel(&bottom, "validation scores").build_cartesian_2d(0.0..xmax, 0.0..1.0)?;
    m.configure_mesh().x_desc("step").x_label_formatter(&|x| format!("{x:.0}")).label_style(("sans-serif", 13)).draw()?;
    let names = ["BLEU-4", "ROUGE-L", "CIDEr-D / 10", "exact match"];
    let colours = [RGBColor(30, 150, 50), RGBColor(130, 130, 130), RGBColor(240, 140, 20), RGBColor(140, 50, 170)];
    for ((pts, name), col) in c.metrics.iter().zip(names).zip(colours) {
        m.draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))?.label(name).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(2)));
        m.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))?;
    }
    m.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 13)).draw()?;
    root.present()?;
    Ok(())
}

fn register_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // The embedded font always parses (unit-tested); were it not to, only the text would be lost.
    *OK.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok())
}

/// Plots the JSON-lines training log at `log` into `png`.
pub fn plot_log(log: &Path, png: &Path) -> Result<()> {
    register_font();
    let text = std::fs::read_to_string(log).map_err(|e| Error::setting("log", format!("{}: {e}", log.display())))?;
    let curves = read_log(&text);
    if curves.train.is_empty() {
        return Err(Error::setting("log", format!("{}: no training loss to plot", log.display())));
    }
    let mut buf = vec![0u8; (W * H * 3) as usize];
    draw(&curves, &mut buf).map_err(|e| Error::setting("plot", format!("cannot draw {}: {e}", png.display())))?;
    let img = image::RgbImage::from_raw(W, H, buf).ok_or_else(|| Error::setting("plot", "buffer size"))?;
    img.save(png).map_err(|e| Error::setting("plot", format!("cannot write {}: {e}", png.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_a_log_with_its_text() {
        assert!(register_font(), "the embedded DejaVu Sans must parse");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut text = String::new();
        for s in 1..=20 {
            text += &format!("{{\"step\":{s},\"kind\":\"train\",\"loss\":{}}}\n", 5.0 / s as f64);
        }
        text += "{\"step\":20,\"kind\":\"eval\",\"val_loss\":0.4,\"bleu4\":0.5,\"rouge_l\":0.6,\"cider_d\":3.0,\"exact\":0.2}\n";
        std::fs::write(&log, text).unwrap();
        let png = dir.path().join("plot.png");
        plot_log(&log, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        // The training curve's blue is drawn, and so is text (black glyph pixels in the title row).
        assert!(img.pixels().any(|p| p.0 == [40, 90, 200]));
        let title_dark = (0..W).flat_map(|x| (5..25).map(move |y| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100).count();
        assert!(title_dark > 50, "no title text drawn ({title_dark} dark pixels)");
        // A log with no training loss is an error, not an empty plot.
        std::fs::write(&log, "{}\n").unwrap();
        assert!(plot_log(&log, &png).is_err());
    }
}
