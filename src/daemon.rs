//! `vitgpt2-node run`: frames in, captions out to MQTT, nothing lost.
//!
//! Three threads joined by bounded queues: capture (the frame source), captioning (which
//! takes the latest frame, at most one per interval, and writes each caption to the spool)
//! and publishing (this thread: the MQTT link, status, stats, commands, systemd).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::camera::{self, FrameSource, SourceEvent};
use crate::captioner::{Captioner, StageMs};
use crate::generate::{GenerationConfig, GenerationOverrides};
use crate::runtime::{self, LoadOptions};
use crate::mqtt::{Inbound, Link};
use crate::node_config::{NodeConfig, SourceKind};
use crate::spool::Spool;

/// `vitgpt2-node run` flags; each one overrides the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Node configuration (see firmware-config/node.toml).
    pub config: PathBuf,
    /// Model bundle directory.
    pub model: Option<PathBuf>,
    /// Watch this folder for new images (sets source.kind = "directory").
    pub watch: Option<PathBuf>,
    /// MQTT broker host.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub device_id: Option<String>,
    /// Spool folder.
    pub spool: Option<PathBuf>,
    /// Minimum milliseconds between captions.
    pub interval_ms: Option<u64>,
    /// Stop after this many captions.
    pub max_captions: Option<u64>,
    /// Do not connect to any broker (captions go to the spool and stdout).
    pub no_mqtt: bool,
    pub generation: GenerationOverrides,
}

/// `vitgpt2-node check-config FILE`.
#[derive(Debug, Clone, Default)]
pub struct CheckConfigOptions {
    pub file: PathBuf,
}

pub fn check_config(args: &CheckConfigOptions) -> Result<i32, String> {
    let cfg = NodeConfig::load(&args.file).map_err(|e| e.to_string())?;
    if !cfg.model.dir.is_dir() {
        return Err(format!("{}: model.dir: {} is not a folder; point it at a model bundle", args.file.display(), cfg.model.dir.display()));
    }
    if cfg.source.kind == SourceKind::Files {
        camera::open(&cfg.source).map_err(|e| format!("{}: {e}", args.file.display()))?;
    }
    if cfg.mqtt.enabled {
        cfg.password().map_err(|e| format!("{}: {e}", args.file.display()))?;
    }
    println!("{}: ok", args.file.display());
    Ok(0)
}

#[derive(Default)]
pub struct Counters {
    pub frames: AtomicU64,
    pub bad_frames: AtomicU64,
    pub dropped_stale: AtomicU64,
    pub unchanged: AtomicU64,
    pub paused: AtomicU64,
    pub captions: AtomicU64,
    pub caption_errors: AtomicU64,
}

/// Flags shared by the threads.
#[derive(Default)]
struct Control {
    /// SIGTERM/SIGINT or max_captions: stop capturing, finish the caption in flight.
    stop: Arc<AtomicBool>,
    paused: AtomicBool,
    caption_now: AtomicBool,
    source_error: Mutex<Option<String>>,
    /// When the captioning thread last went round its loop: the systemd watchdog is fed only
    /// while this is recent, so a hung model run (not just a hung publisher) gets restarted.
    caption_beat: Mutex<Option<Instant>>,
}

impl Control {
    /// The captioning thread is alive (see `caption_beat`).
    fn beat(&self) {
        if let Ok(mut b) = self.caption_beat.lock() {
            *b = Some(Instant::now());
        }
    }

    /// Whether the captioning thread went round its loop within `within` (true before it starts).
    fn caption_alive(&self, within: Duration) -> bool {
        self.caption_beat.lock().ok().and_then(|b| *b).is_none_or(|t| t.elapsed() < within)
    }
}

struct Frame {
    seq: u64,
    image: image::RgbImage,
    origin: String,
    at: SystemTime,
    received: Instant,
}

#[derive(Serialize)]
struct ModelInfo {
    id: String,
    sha256: String,
}

#[derive(Serialize)]
struct Latency<'a> {
    #[serde(flatten)]
    stages: &'a StageMs,
    /// From capture to the end of captioning.
    capture_to_caption: f64,
}

#[derive(Serialize)]
struct CaptionMessage<'a> {
    id: String,
    seq: u64,
    caption: &'a str,
    /// The caption cut to 255 bytes on a character boundary (Home Assistant's state limit).
    state: &'a str,
    language: &'static str,
    timestamp: String,
    source: &'a str,
    latency_ms: Latency<'a>,
    model: &'a ModelInfo,
    score: f32,
    tokens: &'a [u32],
}

/// Logs for the daemon: stderr, one line per event, colours only on a terminal (journald
/// shows escape codes verbatim); the config's `log.level`, unless `RUST_LOG` is set.
pub fn init_logging(config: &Path) {
    use std::io::IsTerminal;
    let level = log_level(config);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The log filter a config asks for ("info" if it cannot be read: `run` reports why).
pub fn log_level(config: &Path) -> String {
    NodeConfig::load(config).map(|c| c.log.level).unwrap_or_else(|_| "info".into())
}

pub fn run(args: &RunOptions) -> Result<i32, String> {
    let mut cfg = NodeConfig::load(&args.config).map_err(|e| e.to_string())?;
    apply_overrides(&mut cfg, args);
    let gen_over = args.generation.or(&cfg.model.generation);

    let stop = Arc::new(AtomicBool::new(false));
    // A second signal ends at once, for a daemon stuck on something.
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop)).map_err(|e| format!("signals: {e}"))?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| format!("signals: {e}"))?;
    }

    let spool = Spool::open(&cfg.spool.dir, cfg.spool.max_messages, cfg.spool.fsync)?;
    if !spool.is_empty() {
        tracing::info!(spool = spool.len(), dir = %cfg.spool.dir.display(), "spool holds captions from an earlier run: they go first");
    }
    let captioner = runtime::open(&cfg.model.dir, &LoadOptions { dtype: cfg.dtype(), layout: None, threads: cfg.model.threads })
        .map_err(|e| e.to_string())?;
    let gen = gen_over.apply(captioner.generation_config()).map_err(|e| e.to_string())?;
    let model = ModelInfo {
        id: cfg.model.id.clone().unwrap_or_else(|| {
            cfg.model.dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into())
        }),
        sha256: graphs_sha256(&captioner.engine().weight_files())?,
    };
    let source = camera::open(&cfg.source)?;
    tracing::info!(source = %source.describe(), model = %model.id, sha256 = %model.sha256, "starting");

    if cfg.broker.enabled {
        crate::broker::start(&cfg.broker)?;
    }
    let mut link = if cfg.mqtt.enabled { Some(Link::new(&cfg)?) } else { None };
    let spool = Arc::new(Mutex::new(spool));
    let counters = Arc::new(Counters::default());
    let control = Arc::new(Control { stop: Arc::clone(&stop), ..Default::default() });
    let live = source.live();
    let (frame_tx, frame_rx) = bounded::<Frame>(cfg.schedule.queue);
    let (wake_tx, wake_rx) = bounded::<()>(1);

    let capture = {
        let (control, counters, rx) = (Arc::clone(&control), Arc::clone(&counters), frame_rx.clone());
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || capture_loop(source, frame_tx, rx, &control, &counters))
            .map_err(|e| format!("cannot start the capture thread: {e}"))?
    };
    let captioning = {
        let (control, counters, spool) = (Arc::clone(&control), Arc::clone(&counters), Arc::clone(&spool));
        let sched = cfg.schedule.clone();
        let to_stdout = cfg.log.stdout;
        std::thread::Builder::new()
            .name("caption".into())
            .spawn(move || caption_loop(captioner, gen, model, frame_rx, live, &sched, to_stdout, &control, &counters, &spool, wake_tx))
            .map_err(|e| format!("cannot start the captioning thread: {e}"))?
    };

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    publish_loop(&cfg, link.as_mut(), &spool, &counters, &control, &wake_rx, &captioning);
    let _ = capture.join();
    let _ = captioning.join();
    let left = spool.lock().map(|s| s.len()).unwrap_or(0);
    tracing::info!(captions = counters.captions.load(Relaxed), spool_left = left, "stopped");
    Ok(0)
}

fn apply_overrides(cfg: &mut NodeConfig, a: &RunOptions) {
    if let Some(m) = &a.model {
        cfg.model.dir = m.clone();
    }
    if let Some(w) = &a.watch {
        cfg.source.kind = SourceKind::Directory;
        cfg.source.path = Some(w.clone());
    }
    if let Some(h) = &a.host {
        cfg.mqtt.host = h.clone();
    }
    if let Some(p) = a.port {
        cfg.mqtt.port = p;
    }
    if let Some(d) = &a.device_id {
        cfg.mqtt.device_id = d.clone();
    }
    if let Some(s) = &a.spool {
        cfg.spool.dir = s.clone();
    }
    if let Some(i) = a.interval_ms {
        cfg.schedule.interval_ms = i;
    }
    if let Some(n) = a.max_captions {
        cfg.schedule.max_captions = n;
    }
    if a.no_mqtt {
        cfg.mqtt.enabled = false;
    }
}

/// sha256 over the bundle's graphs, in order: identifies the exact weights in each message.
pub fn graphs_sha256(paths: &[PathBuf]) -> Result<String, String> {
    let mut h = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p).map_err(|e| format!("model bundle: {}: {e}", p.display()))?;
        std::io::copy(&mut f, &mut h).map_err(|e| format!("model bundle: {}: {e}", p.display()))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn capture_loop(mut source: Box<dyn FrameSource>, tx: Sender<Frame>, rx: Receiver<Frame>, control: &Control, counters: &Counters) {
    let mut seq = 0u64;
    let mut backoff = crate::mqtt::Backoff::new(1000, 30_000);
    while !control.stop.load(Relaxed) {
        match source.next(Duration::from_millis(100)) {
            SourceEvent::Frame { image, origin } => {
                backoff.reset();
                if let Ok(mut e) = control.source_error.lock() {
                    if e.take().is_some() {
                        tracing::info!(source = %source.describe(), "source available again");
                    }
                }
                seq += 1;
                counters.frames.fetch_add(1, Relaxed);
                let mut frame = Frame { seq, image, origin, at: SystemTime::now(), received: Instant::now() };
                if source.live() {
                    // Newest wins: make room by dropping the oldest waiting frame.
                    loop {
                        match tx.try_send(frame) {
                            Ok(()) => break,
                            Err(TrySendError::Full(f)) => {
                                if rx.try_recv().is_ok() {
                                    counters.dropped_stale.fetch_add(1, Relaxed);
                                }
                                frame = f;
                            }
                            Err(TrySendError::Disconnected(_)) => return,
                        }
                    }
                } else {
                    // Files must each be captioned: wait for room, but keep watching `stop`.
                    loop {
                        match tx.send_timeout(frame, Duration::from_millis(100)) {
                            Ok(()) => break,
                            Err(crossbeam_channel::SendTimeoutError::Timeout(f)) => {
                                if control.stop.load(Relaxed) {
                                    return;
                                }
                                frame = f;
                            }
                            Err(_) => return,
                        }
                    }
                }
            }
            SourceEvent::Bad { origin, error } => {
                counters.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(frame = %origin, error = %crate::error::one_line(&error), "frame skipped: cannot decode it");
            }
            SourceEvent::Idle => {}
            SourceEvent::Unavailable(e) => {
                let wait = backoff.next();
                tracing::warn!(retry_in_ms = wait.as_millis() as u64, "source unavailable: {e}");
                if let Ok(mut s) = control.source_error.lock() {
                    *s = Some(e);
                }
                sleep_unless(&control.stop, wait);
            }
            SourceEvent::End => {
                tracing::info!(frames = seq, "source ended");
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn caption_loop(
    captioner: Captioner,
    gen: GenerationConfig,
    model: ModelInfo,
    rx: Receiver<Frame>,
    live: bool,
    sched: &crate::node_config::ScheduleSection,
    to_stdout: bool,
    control: &Control,
    counters: &Counters,
    spool: &Mutex<Spool>,
    wake: Sender<()>,
) {
    let interval = Duration::from_millis(sched.interval_ms);
    let mut last_start: Option<Instant> = None;
    let mut last_thumb: Option<camera::Thumb> = None;
    loop {
        control.beat();
        if control.stop.load(Relaxed) {
            return;
        }
        // At most one caption per interval, unless asked for one now.
        if let Some(t) = last_start {
            while t.elapsed() < interval && !control.caption_now.load(Relaxed) && !control.stop.load(Relaxed) {
                std::thread::sleep((interval - t.elapsed()).min(Duration::from_millis(20)));
                control.beat();
            }
        }
        let mut frame = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(f) => f,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        if live {
            while let Ok(newer) = rx.try_recv() {
                counters.dropped_stale.fetch_add(1, Relaxed);
                frame = newer;
            }
        }
        let forced = control.caption_now.swap(false, Relaxed);
        if control.paused.load(Relaxed) && !forced {
            counters.paused.fetch_add(1, Relaxed);
            continue;
        }
        if sched.change_threshold > 0.0 && !forced {
            let thumb = camera::thumbnail(&frame.image);
            if let Some(prev) = &last_thumb {
                let d = camera::difference(prev, &thumb);
                if d < sched.change_threshold {
                    counters.unchanged.fetch_add(1, Relaxed);
                    tracing::debug!(seq = frame.seq, difference = d, "frame skipped: unchanged");
                    continue;
                }
            }
            last_thumb = Some(thumb);
        }
        last_start = Some(Instant::now());
        let c = match captioner.caption_image(&frame.image, &gen) {
            Ok(c) => c,
            Err(e) => {
                counters.caption_errors.fetch_add(1, Relaxed);
                tracing::error!(frame = %frame.origin, error = %e, "captioning failed");
                continue;
            }
        };
        let msg = CaptionMessage {
            id: uuid::Uuid::now_v7().to_string(),
            seq: frame.seq,
            caption: &c.caption,
            state: cut_utf8(&c.caption, 255),
            language: "fr",
            timestamp: rfc3339_ms(frame.at),
            source: &frame.origin,
            latency_ms: Latency { stages: &c.ms, capture_to_caption: frame.received.elapsed().as_secs_f64() * 1e3 },
            model: &model,
            score: c.score,
            tokens: &c.tokens,
        };
        let payload = match serde_json::to_vec(&msg) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize a caption");
                continue;
            }
        };
        let stored = spool.lock().map_err(|_| "spool lock poisoned".to_string()).and_then(|mut s| s.append(&payload));
        if let Err(e) = stored {
            tracing::error!("{e}");
        }
        let _ = wake.try_send(());
        let n = counters.captions.fetch_add(1, Relaxed) + 1;
        tracing::info!(seq = frame.seq, id = %msg.id, source = %frame.origin, ms = c.ms.total.round(), caption = %c.caption, "caption");
        if to_stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&payload).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush());
        }
        if sched.max_captions > 0 && n >= sched.max_captions {
            tracing::info!(captions = n, "max_captions reached: stopping");
            control.stop.store(true, Relaxed);
            return;
        }
    }
}

#[derive(Serialize)]
struct Stats {
    frames: u64,
    captions: u64,
    bad_frames: u64,
    dropped_stale: u64,
    unchanged: u64,
    paused_skipped: u64,
    caption_errors: u64,
    spool_depth: usize,
    spool_dropped: u64,
    oversize_dropped: u64,
    reconnects: u64,
    rss_kb: u64,
    uptime_s: u64,
    paused: bool,
    source_error: Option<String>,
}

fn publish_loop(
    cfg: &NodeConfig,
    mut link: Option<&mut Link>,
    spool: &Mutex<Spool>,
    counters: &Counters,
    control: &Control,
    wake: &Receiver<()>,
    captioning: &std::thread::JoinHandle<()>,
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
        let done = captioning.is_finished();
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
            let empty = spool.lock().map(|s| s.is_empty()).unwrap_or(true);
            if (empty && link.unacked() == 0) || Instant::now() >= deadline || !cfg.mqtt.enabled {
                if !empty {
                    tracing::warn!("shutdown: broker did not take every caption in time; the rest stay in the spool for the next run");
                }
                shutdown(link, spool, &status_topic);
                return;
            }
        }
        link.maintain();
        if link.connected() && !was_connected {
            link.publish(&status_topic, true, b"online".to_vec());
            if cfg.mqtt.ha_discovery {
                publish_discovery(cfg, link);
            }
        }
        was_connected = link.connected();
        if let Ok(mut s) = spool.lock() {
            link.pump(&mut s);
        }
        if link.connected() {
            let err = control.source_error.lock().ok().and_then(|e| e.clone());
            if err != last_source_error {
                let text = err.clone().unwrap_or_else(|| "ok".into());
                link.publish(&cfg.topic("status/source"), true, text.into_bytes());
                last_source_error = err;
            }
            if let Some(every) = stats_every {
                if last_stats.elapsed() >= every {
                    last_stats = Instant::now();
                    let s = stats(counters, spool, link, started, control);
                    if let Ok(p) = serde_json::to_vec(&s) {
                        link.publish(&cfg.topic("stats"), false, p);
                    }
                }
            }
        }
        let wait = link.until_next_try().unwrap_or(Duration::from_millis(500)).min(Duration::from_millis(200));
        let events = link.events.clone();
        select! {
            recv(events) -> ev => {
                if let Ok(ev) = ev {
                    let inbound = spool.lock().ok().and_then(|mut s| link.handle(ev, &mut s));
                    match inbound {
                        Some(Inbound::Command(c)) => command(&c, control),
                        Some(Inbound::HomeAssistantOnline) => publish_discovery(cfg, link),
                        None => {}
                    }
                }
            }
            recv(wake) -> _ => {}
            default(wait) => {}
        }
    }
}

/// Retained `offline` (acknowledged, so it is on the broker before we go), then disconnect.
fn shutdown(link: &mut Link, spool: &Mutex<Spool>, status_topic: &str) {
    if link.connected() {
        link.publish_offline(status_topic);
        let end = Instant::now() + Duration::from_secs(2);
        let events = link.events.clone();
        while !link.offline_acked && link.connected() && Instant::now() < end {
            if let Ok(ev) = events.recv_timeout(Duration::from_millis(100)) {
                if let Ok(mut s) = spool.lock() {
                    link.handle(ev, &mut s);
                }
            }
        }
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
    let (depth, dropped) = spool.lock().map(|s| (s.len(), s.dropped)).unwrap_or((0, 0));
    Stats {
        frames: counters.frames.load(Relaxed),
        captions: counters.captions.load(Relaxed),
        bad_frames: counters.bad_frames.load(Relaxed),
        dropped_stale: counters.dropped_stale.load(Relaxed),
        unchanged: counters.unchanged.load(Relaxed),
        paused_skipped: counters.paused.load(Relaxed),
        caption_errors: counters.caption_errors.load(Relaxed),
        spool_depth: depth,
        spool_dropped: dropped,
        oversize_dropped: link.oversize,
        reconnects: link.reconnects,
        rss_kb: rss_kb(),
        uptime_s: started.elapsed().as_secs(),
        paused: control.paused.load(Relaxed),
        source_error: control.source_error.lock().ok().and_then(|e| e.clone()),
    }
}

/// Home Assistant MQTT discovery: one sensor whose state is the (cut) caption, with the
/// whole message as attributes, available while the node is online.
fn publish_discovery(cfg: &NodeConfig, link: &mut Link) {
    let dev = &cfg.mqtt.device_id;
    let uid = format!("vitgpt2_{}_caption", dev.replace(['/', ' '], "_"));
    let body = serde_json::json!({
        "name": "Caption",
        "unique_id": uid,
        "state_topic": cfg.topic("caption"),
        "value_template": "{{ value_json.state }}",
        "json_attributes_topic": cfg.topic("caption"),
        "availability_topic": cfg.topic("status"),
        "payload_available": "online",
        "payload_not_available": "offline",
        "icon": "mdi:image-text",
        "device": {
            "identifiers": [format!("vitgpt2_{dev}")],
            "name": format!("vitgpt2 {dev}"),
            "manufacturer": "vitgpt2",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
    });
    let topic = format!("{}/sensor/{}/config", cfg.mqtt.discovery_prefix, uid);
    link.publish(&topic, true, body.to_string().into_bytes());
}

/// Resident memory from /proc (0 where there is none).
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn cut_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `2026-11-27T10:00:00.123Z`, without a date crate.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap day
        assert_eq!(rfc3339_ms(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn cut_on_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let c = cut_utf8(&s, 255);
        assert_eq!(c.len(), 254);
        assert_eq!(cut_utf8("abc", 255), "abc");
    }
}
