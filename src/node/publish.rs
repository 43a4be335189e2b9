//! The publisher (the daemon's main thread): drives the MQTT link, publishes status, source
//! health, stats and discovery, takes commands, pings systemd's watchdog, and at the end
//! flushes the spool and publishes `offline`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::config::NodeConfig;
use super::message::{discovery, Stats};
use super::mqtt::{Inbound, Link};
use super::spool::Spool;
use super::{lock, rss_kb, Control, Counters};

/// Runs until the captioning thread has ended (stop, end of source, failure) and the spool is
/// flushed or `mqtt.shutdown_flush_s` has passed.
pub fn publish_loop(
    cfg: &NodeConfig,
    mut link: Option<&mut Link>,
    spool: &Mutex<Spool>,
    counters: &Counters,
    control: &Control,
    wake: &Receiver<()>,
    captioning_done: &dyn Fn() -> bool,
) {
    let started = Instant::now();
    let status_topic = cfg.topic("status");
    let stats_every = (cfg.mqtt.stats_interval_s > 0).then(|| Duration::from_secs(cfg.mqtt.stats_interval_s));
    let mut last_stats = Instant::now();
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec).then(|| Duration::from_micros(watchdog_usec / 2));
    let mut last_ping = Instant::now();
    let mut was_connected = false;
    let mut last_source_error: Option<String> = None;
    let mut flush_deadline: Option<Instant> = None;

    loop {
        if let Some(w) = watchdog {
            // `w` is half of WatchdogSec; a captioning thread silent for a whole WatchdogSec
            // (one caption plus the interval wait never takes that long) stops the pings.
            if last_ping.elapsed() >= w && control.caption_alive(2 * w) {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                last_ping = Instant::now();
            }
        }
        lock(spool).retry_disk();
        let done = captioning_done();
        if done && flush_deadline.is_none() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            flush_deadline = Some(Instant::now() + Duration::from_secs(cfg.mqtt.shutdown_flush_s));
        }
        let Some(link) = link.as_deref_mut() else {
            if done {
                return;
            }
            let _ = wake.recv_timeout(Duration::from_millis(200));
            continue;
        };
        if let Some(deadline) = flush_deadline {
            let empty = lock(spool).is_empty();
            if (empty && link.unacked() == 0) || Instant::now() >= deadline {
                if !empty {
                    let next = if cfg.spool.replay { "the next run sends them first" } else { "spool.replay = false: the next run deletes them" };
                    tracing::warn!(spool = lock(spool).len(), "shutdown: broker did not take every caption in time; they stay in the spool ({next})");
                }
                shutdown(link, spool, &status_topic);
                return;
            }
        }
        if link.connected() && !was_connected {
            link.publish(&status_topic, true, b"online".to_vec());
            if cfg.mqtt.ha_discovery {
                let (topic, body) = discovery(cfg);
                link.publish(&topic, true, body);
            }
        }
        // A source error is sent again on every connection (a broker restarted without
        // persistence has lost the retained one).
        let reconnected = link.connected() && !was_connected;
        was_connected = link.connected();
        if link.connected() {
            let err = lock(&control.source_error).clone();
            if err != last_source_error || (reconnected && err.is_some()) {
                let text = err.clone().unwrap_or_else(|| "ok".into());
                link.publish(&cfg.topic("status/source"), true, text.into_bytes());
                last_source_error = err;
            }
            if stats_every.is_some_and(|every| last_stats.elapsed() >= every) {
                last_stats = Instant::now();
                let topic = cfg.topic("stats");
                let mut s = stats(counters, spool, link, started, control);
                let mut payload = serde_json::to_vec(&s);
                // Over a broker's small packet limit, the counters matter more than the text.
                if payload.as_ref().is_ok_and(|p| !link.fits(&topic, p.len())) {
                    s.link_error = None;
                    payload = serde_json::to_vec(&s);
                }
                match payload {
                    Ok(p) => link.publish(&topic, false, p),
                    Err(e) => tracing::error!(error = %e, "stats not published: cannot serialize them"),
                }
            }
        }
        match link.step(spool, wake, Duration::from_millis(200)) {
            Some(Inbound::Command(c)) => command(&c, control),
            Some(Inbound::HomeAssistantOnline) => {
                let (topic, body) = discovery(cfg);
                link.publish(&topic, true, body);
            }
            None => {}
        }
    }
}

/// Retained `offline` (acknowledged, so it is on the broker before we go), then DISCONNECT.
fn shutdown(link: &mut Link, spool: &Mutex<Spool>, status_topic: &str) {
    if link.connected() {
        link.publish_offline(status_topic);
        link.settle(spool, Duration::from_secs(2));
    }
    link.disconnect();
}

fn command(c: &str, control: &Control) {
    match c {
        "caption" | "caption_now" => control.caption_now.store(true, Relaxed),
        "pause" => control.paused.store(true, Relaxed),
        "resume" => control.paused.store(false, Relaxed),
        other => {
            tracing::warn!(command = %crate::error::one_line(other), "unknown command on cmd topic: use caption, pause or resume");
            return;
        }
    }
    tracing::info!(command = c, "command");
}

fn stats(counters: &Counters, spool: &Mutex<Spool>, link: &Link, started: Instant, control: &Control) -> Stats {
    Stats {
        frames: counters.frames.load(Relaxed),
        captions: counters.captions.load(Relaxed),
        bad_frames: counters.bad_frames.load(Relaxed),
        dropped_stale: counters.dropped_stale.load(Relaxed),
        unchanged: counters.unchanged.load(Relaxed),
        paused_skipped: counters.paused.load(Relaxed),
        caption_errors: counters.caption_errors.load(Relaxed),
        rss_kb: rss_kb(),
        uptime_s: started.elapsed().as_secs(),
        paused: control.paused.load(Relaxed),
        source_error: lock(&control.source_error).clone(),
        ..Default::default()
    }
    .with(lock(spool).counts(), Some(&link.stats()))
}
