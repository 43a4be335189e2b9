//! Caption data sets and the batch pipeline.
//!
//! Two caption formats:
//! - COCO's `captions_*.json`: `images` (id, file_name) + `annotations` (image_id, caption);
//! - the original project's flat records (`image_id`, `id`, `caption`, `en`, `fr`), as a JSON
//!   array or JSON lines, the image being `{image_id:012}.jpg`.
//!
//! The caption field is selectable (`--caption-field fr`). Records whose image is missing are
//! reported and skipped at load time; images that fail to decode are reported and skipped when
//! their batch is built (never a crash mid-run). Images are decoded and resized on worker
//! threads, a bounded number of batches ahead of the trainer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::Value;

use crate::rng::SplitMix;
use crate::error::{Error, Result};
use crate::preprocess::{decode_image, PreprocessConfig};

/// One (image, caption) training pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: PathBuf,
    pub image_id: u64,
    pub caption: String,
}

/// A loaded caption file: the usable pairs and what was skipped, one line per reason.
#[derive(Debug, Clone, Default)]
pub struct CaptionSet {
    pub samples: Vec<Sample>,
    pub skipped: Vec<String>,
}

impl CaptionSet {
    /// The images in first-appearance order, each with all its captions (the references).
    pub fn references(&self) -> Vec<(PathBuf, Vec<String>)> {
        let mut order: Vec<PathBuf> = Vec::new();
        let mut refs: HashMap<PathBuf, Vec<String>> = HashMap::new();
        for s in &self.samples {
            let e = refs.entry(s.image.clone()).or_insert_with(|| {
                order.push(s.image.clone());
                Vec::new()
            });
            e.push(s.caption.clone());
        }
        order.into_iter().map(|p| {
            let r = refs.remove(&p).unwrap_or_default();
            (p, r)
        }).collect()
    }

    /// Splits off the images whose id falls in the last `fraction` (by a hash of the id, so
    /// the split is stable): (train, held out).
    pub fn split(self, fraction: f64) -> (CaptionSet, CaptionSet) {
        let held = |id: u64| {
            let h = SplitMix::new(id ^ 0x5EED).next_u64();
            (h % 10_000) as f64 / 10_000.0 < fraction
        };
        let (val, train): (Vec<Sample>, Vec<Sample>) = self.samples.into_iter().partition(|s| held(s.image_id));
        (CaptionSet { samples: train, skipped: self.skipped }, CaptionSet { samples: val, skipped: Vec::new() })
    }

    /// A one-paragraph report of the skipped records (first few listed).
    pub fn skip_report(&self, what: &str) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let shown: Vec<&str> = self.skipped.iter().take(5).map(|s| s.as_str()).collect();
        let more = if self.skipped.len() > 5 { format!(" (and {} more)", self.skipped.len() - 5) } else { String::new() };
        Some(format!("{what}: skipped {} record(s): {}{more}", self.skipped.len(), shown.join("; ")))
    }

    /// Decodes every image once (on `workers` threads) and drops the pairs whose image does
    /// not decode, reporting each; returns how many images were dropped.
    pub fn verify_images(&mut self, workers: usize) -> usize {
        let images: Vec<PathBuf> = self.samples.iter().map(|s| s.image.clone()).collect::<HashSet<_>>().into_iter().collect();
        let bad = Mutex::new(Vec::new());
        let chunk = images.len().div_ceil(workers.max(1)).max(1);
        std::thread::scope(|sc| {
            for part in images.chunks(chunk) {
                let bad = &bad;
                sc.spawn(move || {
                    for p in part {
                        if let Err(e) = read_and_decode(p) {
                            bad.lock().map(|mut b| b.push((p.clone(), e.to_string()))).ok();
                        }
                    }
                });
            }
        });
        // A poisoned lock still holds every failure recorded before the panic.
        let mut bad = bad.into_inner().unwrap_or_else(|e| e.into_inner());
        bad.sort();
        let set: HashSet<PathBuf> = bad.iter().map(|(p, _)| p.clone()).collect();
        for (p, e) in &bad {
            self.skipped.push(format!("{}: {e}", p.display()));
        }
        self.samples.retain(|s| !set.contains(&s.image));
        set.len()
    }
}

/// Errors: [`Error::Invalid`] without the path, which the callers' reports put first.
fn read_and_decode(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::Invalid(format!("cannot read: {e}")))?;
    decode_image(&bytes)
}

fn json_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::setting("captions", format!("{}: {msg}", path.display()))
}

/// Loads a caption file (COCO, flat JSON array or JSON lines). `images_dir` defaults to
/// `<file's folder>/images` when it exists, else the file's folder.
pub fn load_captions(path: &Path, images_dir: Option<&Path>, field: &str) -> Result<CaptionSet> {
    let text = std::fs::read_to_string(path).map_err(|e| json_err(path, format!("cannot read ({e}); pass a COCO captions_*.json or a flat records file")))?;
    let parent = path.parent().unwrap_or(Path::new("."));
    let dir = match images_dir {
        Some(d) => d.to_path_buf(),
        None if parent.join("images").is_dir() => parent.join("images"),
        None => parent.to_path_buf(),
    };
    if !dir.is_dir() {
        return Err(Error::setting("images", format!("{} is not a folder; pass the image folder with --train-images/--val-images", dir.display())));
    }
    let trimmed = text.trim_start();
    let mut set = if trimmed.starts_with('{') && serde_json::from_str::<Value>(&text).is_ok() {
        let v: Value = serde_json::from_str(&text).map_err(|e| json_err(path, e))?;
        if v.get("annotations").is_some() {
            load_coco(&v, path, &dir, field)?
        } else {
            // A single flat record.
            load_flat(vec![v], path, &dir, field)
        }
    } else if trimmed.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text).map_err(|e| json_err(path, format!("not a JSON array of records: {e}")))?;
        load_flat(v, path, &dir, field)
    } else {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| json_err(path, format!("line {}: not JSON: {e}", i + 1)))?;
            records.push(v);
        }
        load_flat(records, path, &dir, field)
    };
    if set.samples.is_empty() {
        let why = set.skipped.first().cloned().unwrap_or_else(|| "no records".into());
        return Err(json_err(path, format!("no usable caption (first problem: {why}); check --caption-field and the image folder")));
    }
    set.samples.shrink_to_fit();
    Ok(set)
}

fn caption_of(v: &Value, field: &str) -> Option<String> {
    v.get(field).and_then(|c| c.as_str()).map(|c| c.trim().to_string()).filter(|c| !c.is_empty())
}

fn load_coco(v: &Value, path: &Path, dir: &Path, field: &str) -> Result<CaptionSet> {
    let images = v.get("images").and_then(|i| i.as_array()).ok_or_else(|| json_err(path, "COCO file without an `images` array"))?;
    let annotations = v.get("annotations").and_then(|a| a.as_array()).ok_or_else(|| json_err(path, "`annotations` is not an array"))?;
    let mut files: HashMap<u64, (PathBuf, bool)> = HashMap::new();
    for im in images {
        if let (Some(id), Some(name)) = (im.get("id").and_then(|i| i.as_u64()), im.get("file_name").and_then(|f| f.as_str())) {
            let p = dir.join(name);
            let exists = p.is_file();
            files.insert(id, (p, exists));
        }
    }
    let mut set = CaptionSet::default();
    let mut missing_reported = HashSet::new();
    for (i, a) in annotations.iter().enumerate() {
        let Some(image_id) = a.get("image_id").and_then(|x| x.as_u64()) else {
            set.skipped.push(format!("annotation #{i}: no image_id"));
            continue;
        };
        let Some(caption) = caption_of(a, field) else {
            set.skipped.push(format!("annotation #{i} (image {image_id}): no `{field}` text"));
            continue;
        };
        match files.get(&image_id) {
            None => set.skipped.push(format!("annotation #{i}: image {image_id} is not in `images`")),
            Some((p, false)) => {
                if missing_reported.insert(image_id) {
                    set.skipped.push(format!("{}: missing", p.display()));
                }
            }
            Some((p, true)) => set.samples.push(Sample { image: p.clone(), image_id, caption }),
        }
    }
    Ok(set)
}

fn load_flat(records: Vec<Value>, _path: &Path, dir: &Path, field: &str) -> CaptionSet {
    let mut set = CaptionSet::default();
    let mut exists: HashMap<u64, bool> = HashMap::new();
    let mut missing_reported = HashSet::new();
    for (i, r) in records.iter().enumerate() {
        let image_id = match r.get("image_id") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let Some(image_id) = image_id else {
            set.skipped.push(format!("record #{i}: no numeric image_id"));
            continue;
        };
        let Some(caption) = caption_of(r, field) else {
            set.skipped.push(format!("record #{i} (image {image_id}): no `{field}` text"));
            continue;
        };
        let image = dir.join(format!("{image_id:012}.jpg"));
        let ok = *exists.entry(image_id).or_insert_with(|| image.is_file());
        if !ok {
            if missing_reported.insert(image_id) {
                set.skipped.push(format!("{}: missing", image.display()));
            }
            continue;
        }
        set.samples.push(Sample { image, image_id, caption });
    }
    set
}

/// The training stream: sample `g` of the run (over all epochs) is
/// `epoch_order(n, seed, g / n)[g % n]`, so any batch is known from its position alone.
#[derive(Debug, Clone)]
pub struct DataOrder {
    pub n: usize,
    pub seed: u64,
    cache: Option<(u64, Arc<Vec<usize>>)>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        DataOrder { n, seed, cache: None }
    }

    /// The sample indices at stream positions `start..start + len`.
    pub fn positions(&mut self, start: u64, len: usize) -> Vec<usize> {
        (start..start + len as u64)
            .map(|g| {
                let (epoch, i) = (g / self.n as u64, (g % self.n as u64) as usize);
                let order = match &self.cache {
                    Some((e, o)) if *e == epoch => o.clone(),
                    _ => {
                        let o = Arc::new(epoch_order(self.n, self.seed, epoch));
                        self.cache = Some((epoch, o.clone()));
                        o
                    }
                };
                order[i]
            })
            .collect()
    }
}

/// A decoded micro-batch: pixel values `[n, 3, h, w]` flattened, and the caption indices of
/// the rows that decoded (images that failed are left out and reported in `failed`).
pub struct Batch {
    pub pixels: Vec<f32>,
    pub rows: Vec<usize>,
    pub failed: Vec<String>,
}

type Decoded = (usize, Result<Vec<f32>>);

/// Decodes `indices` on up to `workers` threads, in order.
pub fn decode_batch(samples: &[Sample], indices: &[usize], pre: &PreprocessConfig, workers: usize) -> Batch {
    let chunk = indices.len().div_ceil(workers.max(1)).max(1);
    let parts: Vec<Vec<Decoded>> = std::thread::scope(|sc| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                let h = sc.spawn(move || {
                    part.iter()
                        .map(|&i| {
                            let r = read_and_decode(&samples[i].image).map(|img| pre.pixel_values(&img).into_iter().collect::<Vec<f32>>());
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                });
                (part, h)
            })
            .collect();
        // A worker that died takes its images with it: they are reported as failed, not lost.
        handles
            .into_iter()
            .map(|(part, h)| h.join().unwrap_or_else(|_| part.iter().map(|&i| (i, Err(Error::Invalid("the decoding thread panicked".into())))).collect()))
            .collect()
    });
    let mut batch = Batch { pixels: Vec::new(), rows: Vec::new(), failed: Vec::new() };
    for (i, r) in parts.into_iter().flatten() {
        match r {
            Ok(px) => {
                batch.pixels.extend(px);
                batch.rows.push(i);
            }
            Err(e) => batch.failed.push(format!("{}: {e}", samples[i].image.display())),
        }
    }
    batch
}

/// Decodes the micro-batches of stream positions `first_micro..` on a background thread,
/// at most `depth` batches ahead (bounded memory).
pub struct Prefetcher {
    rx: Receiver<Batch>,
    _handle: JoinHandle<()>,
}

impl Prefetcher {
    pub fn start(samples: Arc<Vec<Sample>>, seed: u64, micro_batch: usize, first_micro: u64, pre: PreprocessConfig, workers: usize, depth: usize) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            let mut order = DataOrder::new(samples.len(), seed);
            let mut micro = first_micro;
            loop {
                let idx = order.positions(micro * micro_batch as u64, micro_batch);
                let batch = decode_batch(&samples, &idx, &pre, workers);
                if tx.send(batch).is_err() {
                    return;
                }
                micro += 1;
            }
        });
        Prefetcher { rx, _handle: handle }
    }

    pub fn next(&self) -> Result<Batch> {
        self.rx.recv().map_err(|_| Error::runtime("data loader", "the decoding thread stopped"))
    }
}

/// Reports each failing image once.
#[derive(Default)]
pub struct FailureLog(BTreeMap<String, ()>);

impl FailureLog {
    pub fn report(&mut self, failed: &[String]) {
        for f in failed {
            if self.0.insert(f.clone(), ()).is_none() {
                eprintln!("\nwarning: skipping image {f}");
            }
        }
    }
}

/// The permutation of `0..n` for `epoch` under `seed`: the data order of every run with the
/// same seed, so that a resumed run reads the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::new(seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F).wrapping_add(0x1234_5678));
    rng.shuffle(&mut idx);
    idx
}
