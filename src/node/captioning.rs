//! The captioning thread, and the node's only use of the model API (loading a bundle,
//! generation settings, captioning a frame): one place to adapt when that API changes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use sha2::{Digest, Sha256};

use super::camera;
use super::capture::Frame;
use super::config::{NodeConfig, ScheduleSection};
use super::message::{CaptionMessage, ModelInfo};
use super::spool::Spool;
use super::{lock, panic_text, Control, Counters};
use crate::captioner::{Caption, Captioner};
use crate::generate::GenerationOverrides;
use crate::runtime::{self, LoadOptions};
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;

/// Model panics in a row after which the captioner is taken as broken (the thread fails and
/// systemd restarts the daemon); a single one skips its frame.
const PANICS_IN_A_ROW: u32 = 3;

/// A loaded model with its generation settings and the identity published with each caption.
pub struct Model {
    captioner: Captioner,
    gen: GenerationConfig,
    pub info: ModelInfo,
}

fn load(cfg: &NodeConfig) -> Result<Captioner> {
    runtime::open(&cfg.model.dir, &LoadOptions { dtype: cfg.dtype(), layout: None, threads: cfg.model.threads })
}

impl Model {
    /// Loads `model.dir` with `model.generation` (overridden by `overrides`) and hashes its
    /// graphs.
    ///
    /// Errors: [`Error::Bundle`] (a file missing or inconsistent), [`Error::Setting`] (bad
    /// generation settings).
    pub fn open(cfg: &NodeConfig, overrides: &GenerationOverrides) -> Result<Self> {
        let captioner = load(cfg)?;
        let gen = overrides.or(&cfg.model.generation).apply(captioner.generation_config())?;
        let id = cfg.model.id.clone().unwrap_or_else(|| {
            cfg.model.dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into())
        });
        let sha256 = graphs_sha256(&captioner.engine().weight_files())?;
        Ok(Model { captioner, gen, info: ModelInfo { id, sha256 } })
    }

    /// Captions a frame. A panic inside the model is caught and returned as an error: the
    /// captioner only reads its graphs (each call builds its own state), so one input that
    /// trips it does not spoil the next.
    fn caption(&self, image: &image::RgbImage) -> std::result::Result<Caption, (Error, bool)> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::fault("caption");
            self.captioner.caption_image(image, &self.gen)
        })) {
            Ok(r) => r.map_err(|e| (e, false)),
            Err(p) => Err((Error::runtime("caption", format!("panicked: {}", panic_text(&*p))), true)),
        }
    }
}

/// For `check-config --strict`: the bundle loads, with the configured generation settings.
///
/// Errors: as [`Model::open`].
pub fn check_model(cfg: &NodeConfig) -> Result<String> {
    let captioner = load(cfg)?;
    cfg.model.generation.apply(captioner.generation_config())?;
    Ok(format!("{} graph file(s)", captioner.engine().weight_files().len()))
}

/// sha256 over the bundle's graphs, in order: identifies the exact weights in each message.
///
/// Errors: [`Error::Bundle`] naming a graph that cannot be read.
pub fn graphs_sha256(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p).map_err(|e| Error::bundle(p, e))?;
        std::io::copy(&mut f, &mut h).map_err(|e| Error::bundle(p, e))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What the captioning thread needs.
pub struct Job {
    pub model: Model,
    pub frames: Receiver<Frame>,
    /// Live source: only the newest waiting frame is captioned.
    pub live: bool,
    pub sched: ScheduleSection,
    /// Print each caption message on stdout.
    pub to_stdout: bool,
    /// Tells the publisher a caption is in the spool.
    pub wake: Sender<()>,
}

impl Job {
    /// Captions frames until `stop`, the end of the source or `max_captions`.
    ///
    /// Errors: the model panicked [`PANICS_IN_A_ROW`] times in a row ([`Error::Runtime`]).
    pub fn run(self, control: &Control, counters: &Counters, spool: &Mutex<Spool>) -> Result<()> {
        let interval = Duration::from_millis(self.sched.interval_ms);
        let mut last_start: Option<Instant> = None;
        let mut last_thumb: Option<camera::Thumb> = None;
        let mut panics = 0u32;
        loop {
            control.beat();
            if control.stop.load(Relaxed) {
                return Ok(());
            }
            // At most one caption per interval, unless asked for one now.
            if let Some(t) = last_start {
                while t.elapsed() < interval && !control.caption_now.load(Relaxed) && !control.stop.load(Relaxed) {
                    std::thread::sleep((interval - t.elapsed()).min(Duration::from_millis(20)));
                    control.beat();
                }
            }
            let mut frame = match self.frames.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            if self.live {
                while let Ok(newer) = self.frames.try_recv() {
                    counters.dropped_stale.fetch_add(1, Relaxed);
                    frame = newer;
                }
            }
            let forced = control.caption_now.swap(false, Relaxed);
            if control.paused.load(Relaxed) && !forced {
                counters.paused.fetch_add(1, Relaxed);
                continue;
            }
            if self.sched.change_threshold > 0.0 && !forced {
                let thumb = camera::thumbnail(&frame.image);
                if let Some(prev) = &last_thumb {
                    let d = camera::difference(prev, &thumb);
                    if d < self.sched.change_threshold {
                        counters.unchanged.fetch_add(1, Relaxed);
                        tracing::debug!(seq = frame.seq, difference = d, "frame skipped: unchanged");
                        continue;
                    }
                }
                last_thumb = Some(thumb);
            }
            last_start = Some(Instant::now());
            let c = match self.model.caption(&frame.image) {
                Ok(c) => {
                    panics = 0;
                    c
                }
                Err((e, panicked)) => {
                    counters.caption_errors.fetch_add(1, Relaxed);
                    if panicked {
                        panics += 1;
                        if panics >= PANICS_IN_A_ROW {
                            return Err(Error::runtime("caption", format!("the model panicked on {panics} frames in a row, last: {e}")));
                        }
                    }
                    tracing::error!(frame = %frame.origin, error = %e, "captioning failed (counted in caption_errors)");
                    continue;
                }
            };
            let msg = CaptionMessage::new(&frame, &c, &self.model.info);
            let payload = match msg.to_json() {
                Ok(p) => p,
                Err(e) => {
                    counters.caption_errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, "caption not stored (counted in caption_errors)");
                    continue;
                }
            };
            lock(spool).append(payload.clone());
            let _ = self.wake.try_send(());
            let n = counters.captions.fetch_add(1, Relaxed) + 1;
            tracing::info!(seq = frame.seq, id = %msg.id, source = %frame.origin, ms = c.ms.total.round(), caption = %c.caption, "caption");
            if self.to_stdout {
                let mut out = std::io::stdout().lock();
                // A closed stdout must not stop the daemon: the caption is in the spool.
                let _ = out.write_all(&payload).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush());
            }
            if self.sched.max_captions > 0 && n >= self.sched.max_captions {
                tracing::info!(captions = n, "max_captions reached: stopping");
                control.stop.store(true, Relaxed);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_generation_settings_win_field_by_field() {
        let file = GenerationOverrides { num_beams: Some(4), max_length: Some(20), early_stopping: Some("true".into()), ..Default::default() };
        let cli = GenerationOverrides { num_beams: Some(1), ..Default::default() };
        let o = cli.or(&file);
        assert_eq!((o.num_beams, o.max_length, o.early_stopping.as_deref()), (Some(1), Some(20), Some("true")));
    }
}
