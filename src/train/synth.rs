//! A synthetic French captioning set: scenes of coloured shapes with grammatical captions
//! (gender and number agreement), written in COCO format. Byte-for-byte deterministic by seed.
//!
//! A scene is one group of 1–3 identical shapes, or two groups side by side (left/right or
//! above/below). Two-group scenes have two reference captions, one from each side:
//! « deux triangles verts à droite d'un grand cercle rouge » and
//! « un grand cercle rouge à gauche de deux triangles verts ».

use std::path::Path;

use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::rng::SplitMix;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Cercle,
    Carre,
    Triangle,
    Etoile,
    Croix,
}

pub const SHAPES: [Shape; 5] = [Shape::Cercle, Shape::Carre, Shape::Triangle, Shape::Etoile, Shape::Croix];

impl Shape {
    fn feminine(self) -> bool {
        matches!(self, Shape::Etoile | Shape::Croix)
    }
    fn noun(self, plural: bool) -> &'static str {
        match (self, plural) {
            (Shape::Cercle, false) => "cercle",
            (Shape::Cercle, true) => "cercles",
            (Shape::Carre, false) => "carré",
            (Shape::Carre, true) => "carrés",
            (Shape::Triangle, false) => "triangle",
            (Shape::Triangle, true) => "triangles",
            (Shape::Etoile, false) => "étoile",
            (Shape::Etoile, true) => "étoiles",
            (Shape::Croix, _) => "croix",
        }
    }
    /// Is (dx, dy), relative to the centre, inside the shape of radius r?
    fn contains(self, dx: f64, dy: f64, r: f64) -> bool {
        match self {
            Shape::Cercle => dx * dx + dy * dy <= r * r,
            Shape::Carre => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            Shape::Triangle => {
                // Pointing up: apex (0, -r), base at y = 0.8r, half-width 0.95r.
                let (top, bottom, half) = (-r, 0.8 * r, 0.95 * r);
                if dy < top || dy > bottom {
                    return false;
                }
                let t = (dy - top) / (bottom - top);
                dx.abs() <= half * t
            }
            Shape::Etoile => {
                // Five-pointed star: inside if the radius at this angle is under the star's outline.
                let rho = (dx * dx + dy * dy).sqrt();
                if rho > r {
                    return false;
                }
                let theta = dy.atan2(dx) + std::f64::consts::FRAC_PI_2;
                let sector = std::f64::consts::TAU / 5.0;
                let a = theta.rem_euclid(sector) / sector; // 0 at a tip, 0.5 between tips
                let inner = 0.42;
                let edge = 1.0 - (1.0 - inner) * (1.0 - (2.0 * a - 1.0).abs());
                rho <= r * edge
            }
            Shape::Croix => {
                let w = r * 0.33;
                (dx.abs() <= r && dy.abs() <= w) || (dy.abs() <= r && dx.abs() <= w)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Rouge,
    Vert,
    Bleu,
    Jaune,
    Noir,
    Orange,
    Violet,
}

pub const COLOURS: [Colour; 7] =
    [Colour::Rouge, Colour::Vert, Colour::Bleu, Colour::Jaune, Colour::Noir, Colour::Orange, Colour::Violet];

impl Colour {
    fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Rouge => [215, 30, 35],
            Colour::Vert => [30, 150, 45],
            Colour::Bleu => [35, 70, 215],
            Colour::Jaune => [235, 205, 25],
            Colour::Noir => [25, 25, 25],
            Colour::Orange => [245, 130, 10],
            Colour::Violet => [135, 45, 170],
        }
    }
    /// The adjective agreeing with a noun of this gender and number.
    fn adjective(self, feminine: bool, plural: bool) -> String {
        let base = match self {
            Colour::Rouge => "rouge",
            Colour::Jaune => "jaune",
            // A colour named after a fruit is invariable.
            Colour::Orange => return "orange".into(),
            Colour::Vert => "vert",
            Colour::Bleu => "bleu",
            Colour::Noir => "noir",
            Colour::Violet => "violet",
        };
        let mut s = base.to_string();
        if feminine && !base.ends_with('e') {
            if base == "violet" {
                s.push('t');
            }
            s.push('e');
        }
        if plural {
            s.push('s');
        }
        s
    }
}

/// One group of identical shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub count: usize,
    pub big: bool,
    pub shape: Shape,
    pub colour: Colour,
}

impl Group {
    /// « deux petites étoiles vertes », « un grand cercle rouge ».
    pub fn noun_phrase(&self) -> String {
        let (fem, pl) = (self.shape.feminine(), self.count > 1);
        let det = match (self.count, fem) {
            (1, false) => "un",
            (1, true) => "une",
            (2, _) => "deux",
            _ => "trois",
        };
        let size = match (self.big, fem, pl) {
            (true, false, false) => "grand",
            (true, true, false) => "grande",
            (true, false, true) => "grands",
            (true, true, true) => "grandes",
            (false, false, false) => "petit",
            (false, true, false) => "petite",
            (false, false, true) => "petits",
            (false, true, true) => "petites",
        };
        format!("{det} {size} {} {}", self.shape.noun(pl), self.colour.adjective(fem, pl))
    }

    /// « de » + noun phrase, elided before « un »/« une ».
    fn with_de(&self) -> String {
        let np = self.noun_phrase();
        if self.count == 1 {
            format!("d'{np}")
        } else {
            format!("de {np}")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// First group on the left, second on the right.
    LeftOf,
    /// First group above the second.
    Above,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub first: Group,
    pub second: Option<(Relation, Group)>,
}

impl Scene {
    /// Every correct caption of the scene.
    pub fn captions(&self) -> Vec<String> {
        match &self.second {
            None => vec![self.first.noun_phrase()],
            Some((rel, b)) => {
                let a = &self.first;
                let (ab, ba) = match rel {
                    Relation::LeftOf => ("à gauche", "à droite"),
                    Relation::Above => ("au-dessus", "au-dessous"),
                };
                vec![format!("{} {ab} {}", a.noun_phrase(), b.with_de()), format!("{} {ba} {}", b.noun_phrase(), a.with_de())]
            }
        }
    }
}

fn draw_group(rng: &mut SplitMix) -> Group {
    Group {
        count: 1 + rng.below(3),
        big: rng.chance(0.5),
        shape: SHAPES[rng.below(SHAPES.len())],
        colour: COLOURS[rng.below(COLOURS.len())],
    }
}

/// Draws a scene: 40% one group, 60% two distinct groups.
pub fn draw_scene(rng: &mut SplitMix) -> Scene {
    let first = draw_group(rng);
    if rng.chance(0.4) {
        return Scene { first, second: None };
    }
    let rel = if rng.chance(0.5) { Relation::LeftOf } else { Relation::Above };
    let mut first = first;
    first.count = first.count.min(2);
    loop {
        let mut b = draw_group(rng);
        b.count = b.count.min(2);
        if b.shape != first.shape || b.colour != first.colour {
            return Scene { first, second: Some((rel, b)) };
        }
    }
}

fn radius(big: bool, side: f64, rng: &mut SplitMix) -> f64 {
    // Small shapes stay ≥ 10 px wide once the demo model resizes to 64 px, so that a
    // star, a cross and a circle differ by more than a pixel or two; big ones are 1.6× that.
    let (lo, hi) = if big { (0.13, 0.15) } else { (0.08, 0.093) };
    side * (lo + (hi - lo) * rng.uniform())
}

/// Places the shapes of `g` without overlap inside the box `(x0, y0, x1, y1)`.
fn place(g: &Group, bx: (f64, f64, f64, f64), side: f64, rng: &mut SplitMix, out: &mut Vec<(f64, f64, f64, Group)>) {
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    let mut tries = 0;
    while placed.len() < g.count {
        let r = radius(g.big, side, rng);
        let (x0, y0, x1, y1) = (bx.0 + r + 1.0, bx.1 + r + 1.0, bx.2 - r - 1.0, bx.3 - r - 1.0);
        let (cx, cy) = (x0 + (x1 - x0).max(0.0) * rng.uniform(), y0 + (y1 - y0).max(0.0) * rng.uniform());
        tries += 1;
        // Give up on spacing after many tries (never in practice with these sizes).
        let free = placed.iter().all(|&(px, py, pr)| ((px - cx).powi(2) + (py - cy).powi(2)).sqrt() > pr + r + 2.0);
        if free || tries > 500 {
            placed.push((cx, cy, r));
        }
    }
    out.extend(placed.into_iter().map(|(x, y, r)| (x, y, r, *g)));
}

/// Renders a scene on a `side`×`side` image: a light tinted background with noise, then the
/// shapes (colour jittered, edges anti-aliased by 2×2 supersampling).
pub fn render(scene: &Scene, side: u32, rng: &mut SplitMix) -> RgbImage {
    let s = side as f64;
    let backgrounds = [[236, 236, 236], [246, 240, 224], [224, 234, 246], [230, 244, 230], [246, 230, 236]];
    let bg = backgrounds[rng.below(backgrounds.len())];
    let jitter = |rng: &mut SplitMix, v: u8, a: i64| (v as i64 + rng.range(-a, a + 1)).clamp(0, 255) as u8;
    let bg = [jitter(rng, bg[0], 8), jitter(rng, bg[1], 8), jitter(rng, bg[2], 8)];
    let mut shapes = Vec::new();
    let m = s * 0.03;
    match &scene.second {
        None => place(&scene.first, (m, m, s - m, s - m), s, rng, &mut shapes),
        Some((Relation::LeftOf, b)) => {
            place(&scene.first, (m, m, s / 2.0 - m, s - m), s, rng, &mut shapes);
            place(b, (s / 2.0 + m, m, s - m, s - m), s, rng, &mut shapes);
        }
        Some((Relation::Above, b)) => {
            place(&scene.first, (m, m, s - m, s / 2.0 - m), s, rng, &mut shapes);
            place(b, (m, s / 2.0 + m, s - m, s - m), s, rng, &mut shapes);
        }
    }
    let colours: Vec<[u8; 3]> = shapes
        .iter()
        .map(|(_, _, _, g)| {
            let c = g.colour.rgb();
            [jitter(rng, c[0], 12), jitter(rng, c[1], 12), jitter(rng, c[2], 12)]
        })
        .collect();
    let mut img = RgbImage::new(side, side);
    for y in 0..side {
        for x in 0..side {
            let mut acc = [0f64; 3];
            for sy in 0..2 {
                for sx in 0..2 {
                    let (px, py) = (x as f64 + (sx as f64 + 0.5) / 2.0, y as f64 + (sy as f64 + 0.5) / 2.0);
                    let mut c = bg;
                    for (i, (cx, cy, r, g)) in shapes.iter().enumerate() {
                        let (dx, dy) = (px - cx, py - cy);
                        if dx.abs() <= *r && dy.abs() <= *r && g.shape.contains(dx, dy, *r) {
                            c = colours[i];
                        }
                    }
                    for k in 0..3 {
                        acc[k] += c[k] as f64;
                    }
                }
            }
            let noise = rng.range(-6, 7);
            let p = [0, 1, 2].map(|k| ((acc[k] / 4.0).round() as i64 + noise + rng.range(-3, 4)).clamp(0, 255) as u8);
            img.put_pixel(x, y, Rgb(p));
        }
    }
    img
}

#[derive(Serialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CocoAnnotation {
    id: u64,
    image_id: u64,
    caption: String,
}

#[derive(Serialize)]
struct Coco {
    info: serde_json::Value,
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

/// Writes `count` scenes to `out/images/000000xxxxxx.png` and `out/captions.json` (COCO).
pub fn write_set(out: &Path, count: usize, seed: u64, side: u32) -> Result<(usize, usize)> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::setting("--out", format!("cannot create {}: {e}", images_dir.display())))?;
    let mut rng = SplitMix::new(seed);
    let mut coco = Coco {
        info: serde_json::json!({"description": "vitgpt2 synthetic French shapes", "seed": seed, "count": count, "size": side}),
        images: Vec::with_capacity(count),
        annotations: Vec::new(),
    };
    for i in 0..count {
        let id = i as u64 + 1;
        let scene = draw_scene(&mut rng);
        // Each image draws from its own stream, so the scene list does not depend on the pixels.
        let mut pix_rng = SplitMix::new(rng.next_u64());
        let img = render(&scene, side, &mut pix_rng);
        let file_name = format!("{id:012}.png");
        let path = images_dir.join(&file_name);
        img.save(&path).map_err(|e| Error::image(&path, format!("cannot write: {e}")))?;
        coco.images.push(CocoImage { id, file_name, width: side, height: side });
        for c in scene.captions() {
            let aid = coco.annotations.len() as u64 + 1;
            coco.annotations.push(CocoAnnotation { id: aid, image_id: id, caption: c });
        }
    }
    let path = out.join("captions.json");
    let text = serde_json::to_string_pretty(&coco).map_err(|e| Error::setting("captions", e))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::setting("--out", format!("cannot write {}: {e}", path.display())))?;
    Ok((coco.images.len(), coco.annotations.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(count: usize, big: bool, shape: Shape, colour: Colour) -> Group {
        Group { count, big, shape, colour }
    }

    #[test]
    fn shapes_never_overlap() {
        // The worst case is two big shapes in one half of the image.
        let mut rng = SplitMix::new(7);
        for _ in 0..3000 {
            let scene = draw_scene(&mut rng);
            let s = 128.0;
            let m = s * 0.03;
            let mut shapes = Vec::new();
            match &scene.second {
                None => place(&scene.first, (m, m, s - m, s - m), s, &mut rng, &mut shapes),
                Some((_, b)) => {
                    place(&scene.first, (m, m, s / 2.0 - m, s - m), s, &mut rng, &mut shapes);
                    place(b, (s / 2.0 + m, m, s - m, s - m), s, &mut rng, &mut shapes);
                }
            }
            for (i, a) in shapes.iter().enumerate() {
                assert!(a.0 - a.2 >= 0.0 && a.0 + a.2 <= s && a.1 - a.2 >= 0.0 && a.1 + a.2 <= s);
                for b in &shapes[..i] {
                    assert!(((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() > a.2 + b.2, "{scene:?}");
                }
            }
        }
    }

    #[test]
    fn agreement() {
        assert_eq!(g(1, true, Shape::Cercle, Colour::Rouge).noun_phrase(), "un grand cercle rouge");
        assert_eq!(g(2, false, Shape::Etoile, Colour::Vert).noun_phrase(), "deux petites étoiles vertes");
        assert_eq!(g(3, true, Shape::Croix, Colour::Violet).noun_phrase(), "trois grandes croix violettes");
        assert_eq!(g(1, false, Shape::Croix, Colour::Orange).noun_phrase(), "une petite croix orange");
        assert_eq!(g(2, true, Shape::Carre, Colour::Orange).noun_phrase(), "deux grands carrés orange");
        assert_eq!(g(1, true, Shape::Etoile, Colour::Bleu).noun_phrase(), "une grande étoile bleue");
        assert_eq!(g(2, false, Shape::Triangle, Colour::Noir).noun_phrase(), "deux petits triangles noirs");
        let s = Scene {
            first: g(1, true, Shape::Cercle, Colour::Rouge),
            second: Some((Relation::LeftOf, g(2, false, Shape::Triangle, Colour::Vert))),
        };
        assert_eq!(
            s.captions(),
            vec!["un grand cercle rouge à gauche de deux petits triangles verts", "deux petits triangles verts à droite d'un grand cercle rouge"]
        );
    }
}
