//! The capture thread: frames from the source into the captioning queue.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};

use super::backoff::Backoff;
use super::camera::{FrameSource, SourceEvent};
use super::config::{NodeConfig, SourceKind};
use super::{lock, panic_text, sleep_unless, Control, Counters};
use crate::error::{Error, Result};

/// Panics of the source in a row (with no good frame between) after which it is taken as
/// broken and the thread fails (systemd restarts the daemon).
const PANICS_IN_A_ROW: u32 = 5;

/// A frame on its way to the captioner.
pub struct Frame {
    /// Frame number since the daemon started (1, 2, …; gaps are frames dropped or skipped).
    pub seq: u64,
    pub image: image::RgbImage,
    /// Where it came from: a file path, `camera:0`, `synthetic`.
    pub origin: String,
    /// Wall-clock time of capture (the message's `timestamp`).
    pub at: SystemTime,
    /// Monotonic time of capture (the message's `capture_to_caption`).
    pub received: Instant,
}

/// Logs a warning when a file or synthetic source makes frames faster than captions are made:
/// file frames are never dropped, so they would wait longer and longer in the queue.
pub fn warn_if_source_outpaces(cfg: &NodeConfig) {
    if let Some(msg) = source_outpaces(cfg) {
        tracing::warn!("{msg}");
    }
}

/// The warning of [`warn_if_source_outpaces`], if any.
pub fn source_outpaces(cfg: &NodeConfig) -> Option<String> {
    let s = &cfg.source;
    let interval = cfg.schedule.interval_ms;
    (s.kind == SourceKind::Files && interval > 0 && s.rate * interval as f64 > 1000.0 + 1e-9).then(|| {
        format!(
            "source.rate ({} frames/s) is above the caption rate (1 per schedule.interval_ms = {interval} ms): file frames are never dropped, \
             so each waits longer in the queue and capture_to_caption keeps growing; lower source.rate to at most {:.3}",
            s.rate,
            1000.0 / interval as f64
        )
    })
}

/// Runs until `stop`, the end of a finite source, or the captioner going away.
///
/// Errors: the source panicked [`PANICS_IN_A_ROW`] times in a row ([`Error::Source`]).
pub fn capture_loop(mut source: Box<dyn FrameSource>, tx: Sender<Frame>, rx: Receiver<Frame>, control: &Control, counters: &Counters) -> Result<()> {
    let mut seq = 0u64;
    let mut backoff = Backoff::new(1000, 30_000);
    let mut panics = 0u32;
    while !control.stop.load(Relaxed) {
        // A frame that makes a decoder panic is skipped like any bad frame: restarting would
        // meet the same file again.
        let event = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.next(Duration::from_millis(100)))) {
            Ok(ev) => ev,
            Err(p) => {
                panics += 1;
                counters.bad_frames.fetch_add(1, Relaxed);
                let msg = panic_text(&*p);
                if panics >= PANICS_IN_A_ROW {
                    return Err(Error::source(format!("{} panicked {panics} times in a row, last: {msg}", source.describe())));
                }
                tracing::error!(source = %source.describe(), "frame skipped: the source panicked on it: {msg}");
                continue;
            }
        };
        match event {
            SourceEvent::Frame { image, origin } => {
                panics = 0;
                backoff.reset();
                if lock(&control.source_error).take().is_some() {
                    tracing::info!(source = %source.describe(), "source available again");
                }
                seq += 1;
                counters.frames.fetch_add(1, Relaxed);
                let frame = Frame { seq, image, origin, at: SystemTime::now(), received: Instant::now() };
                let sent = if source.live() { send_newest(frame, &tx, &rx, counters) } else { send_each(frame, &tx, control) };
                if !sent {
                    return Ok(());
                }
            }
            SourceEvent::Bad { origin, error } => {
                counters.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(frame = %origin, error = %error, "frame skipped: cannot decode it");
            }
            SourceEvent::Idle => {}
            SourceEvent::Unavailable(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(retry_in_ms = wait.as_millis() as u64, "source unavailable: {e}");
                *lock(&control.source_error) = Some(e.to_string());
                sleep_unless(&control.stop, wait);
            }
            SourceEvent::End => {
                tracing::info!(frames = seq, "source ended");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Live sources: the newest wins, making room by dropping the oldest waiting frame.
/// False when the captioner is gone.
fn send_newest(mut frame: Frame, tx: &Sender<Frame>, rx: &Receiver<Frame>, counters: &Counters) -> bool {
    loop {
        match tx.try_send(frame) {
            Ok(()) => return true,
            Err(TrySendError::Full(f)) => {
                if rx.try_recv().is_ok() {
                    counters.dropped_stale.fetch_add(1, Relaxed);
                }
                frame = f;
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Files must each be captioned: wait for room, but keep watching `stop`. False when stopped
/// or the captioner is gone.
fn send_each(mut frame: Frame, tx: &Sender<Frame>, control: &Control) -> bool {
    loop {
        match tx.send_timeout(frame, Duration::from_millis(100)) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(f)) => {
                if control.stop.load(Relaxed) {
                    return false;
                }
                frame = f;
            }
            Err(SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}
