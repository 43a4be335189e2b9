//! The edge node: `vitgpt2-node run` (frames in, captions out to MQTT, nothing lost) and
//! `vitgpt2-node check-config`.
//!
//! Three threads joined by bounded queues: capture ([`capture`]: the frame source), captioning
//! ([`captioning`]: takes the latest frame, at most one per interval, and writes each caption
//! to the [`spool`]) and publishing ([`publish`], the calling thread: the MQTT [`mqtt::Link`],
//! status, stats, commands, systemd). A thread that panics or fails ends the daemon with a
//! non-zero exit code after `offline` is published, so that systemd restarts it; a panic on
//! one frame or one caption is caught there, counted, and the daemon goes on.

pub mod backoff;
pub mod broker;
pub mod camera;
pub mod capture;
pub mod captioning;
pub mod check;
pub mod config;
mod config_parse;
pub mod message;
pub mod mqtt;
pub mod publish;
pub mod spool;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

pub use check::{check_config, CheckConfigOptions};

use crate::generate::GenerationOverrides;
use crate::error::{Error, Result};
use config::{NodeConfig, SourceKind};
use spool::Spool;

/// `vitgpt2-node run` options; each one set overrides the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Node configuration (see firmware-config/node.toml).
    pub config: PathBuf,
    /// Model bundle directory (`model.dir`).
    pub model: Option<PathBuf>,
    /// Watch this folder for new images (sets `source.kind = "directory"`).
    pub watch: Option<PathBuf>,
    /// MQTT broker host (`mqtt.host`).
    pub host: Option<String>,
    /// MQTT broker port (`mqtt.port`).
    pub port: Option<u16>,
    /// `mqtt.device_id`.
    pub device_id: Option<String>,
    /// Spool folder (`spool.dir`).
    pub spool: Option<PathBuf>,
    /// Minimum milliseconds between captions (`schedule.interval_ms`).
    pub interval_ms: Option<u64>,
    /// Stop after this many captions (`schedule.max_captions`).
    pub max_captions: Option<u64>,
    /// Do not connect to any broker (captions go to the spool and stdout).
    pub no_mqtt: bool,
    /// Generation settings; set ones win over `[model.generation]`.
    pub generation: GenerationOverrides,
}

/// What the threads count, for `…/stats`.
#[derive(Default)]
pub struct Counters {
    pub frames: AtomicU64,
    pub bad_frames: AtomicU64,
    pub dropped_stale: AtomicU64,
    pub unchanged: AtomicU64,
    pub paused: AtomicU64,
    pub captions: AtomicU64,
    /// Captioning failures, panics of the model included.
    pub caption_errors: AtomicU64,
}

/// Flags and state shared by the threads.
#[derive(Default)]
pub struct Control {
    /// SIGTERM/SIGINT, max_captions or a failed thread: stop capturing, finish the caption in
    /// flight.
    pub stop: Arc<AtomicBool>,
    pub paused: AtomicBool,
    pub caption_now: AtomicBool,
    pub source_error: Mutex<Option<String>>,
    /// When the captioning thread last went round its loop: the systemd watchdog is fed only
    /// while this is recent, so a hung model run (not just a hung publisher) gets restarted.
    caption_beat: Mutex<Option<Instant>>,
    /// The first thread failure: the daemon stops and exits non-zero with it.
    failure: Mutex<Option<Error>>,
}

impl Control {
    /// The captioning thread is alive (see `caption_beat`).
    pub fn beat(&self) {
        *lock(&self.caption_beat) = Some(Instant::now());
    }

    /// Whether the captioning thread went round its loop within `within` (true before it starts).
    pub fn caption_alive(&self, within: Duration) -> bool {
        lock(&self.caption_beat).is_none_or(|t| t.elapsed() < within)
    }

    /// Records a thread's failure (the first one wins) and stops the daemon.
    pub fn fail(&self, e: Error) {
        tracing::error!("{e}: stopping (exit code 2)");
        lock(&self.failure).get_or_insert(e);
        self.stop.store(true, Relaxed);
    }

    pub fn failed(&self) -> bool {
        lock(&self.failure).is_some()
    }

    fn take_failure(&self) -> Option<Error> {
        lock(&self.failure).take()
    }
}

/// Locks a mutex shared by the threads. A panic caught while one held it leaves the data as
/// it was (every update is a single call), so the poison is cleared rather than spread.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A panic's message, on one line.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let s = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    crate::error::one_line(&s.unwrap_or_else(|| "panic".into()))
}

/// Fault injection for the daemon's tests, in debug builds only: panics at `point` when
/// `VITGPT2_FAULT` lists it (`point` every time, `point:N` the first N times), e.g.
/// `VITGPT2_FAULT=caption:1`. Points: `frame` (decoding a frame), `caption` (the model).
#[cfg(debug_assertions)]
pub(crate) fn fault(point: &str) {
    use std::collections::HashMap;
    static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let Ok(spec) = std::env::var("VITGPT2_FAULT") else { return };
    for item in spec.split(',') {
        let (name, times) = item.split_once(':').map_or((item, None), |(n, t)| (n, t.parse::<u64>().ok()));
        if name != point {
            continue;
        }
        let hits = {
            let mut h = lock(&HITS);
            let n = h.get_or_insert_with(HashMap::new).entry(point.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        if times.is_none_or(|t| hits <= t) {
            panic!("injected fault at {point} (VITGPT2_FAULT)");
        }
    }
}

#[cfg(not(debug_assertions))]
pub(crate) fn fault(_point: &str) {}

/// Starts a daemon thread whose end is watched: an error or a panic is recorded in `control`
/// (the daemon then stops and exits non-zero); a clean return is just an end.
fn spawn(name: &str, control: &Arc<Control>, body: impl FnOnce() -> Result<()> + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    let (control, thread) = (Arc::clone(control), name.to_string());
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => control.fail(Error::thread(&thread, e)),
            Err(p) => control.fail(Error::thread(&thread, format!("panicked: {}", panic_text(&*p)))),
        })
        .map_err(|e| Error::thread(name, format!("cannot start it: {e}")))
}

/// Logs for the daemon: stderr, one line per event, colours only on a terminal (journald
/// shows escape codes verbatim); the config's `log.level`, unless `RUST_LOG` is set. Panics
/// are logged as one line too.
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
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current().name().unwrap_or("main").to_string();
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(thread = %thread, at = %at, "panic: {}", panic_text(info.payload()));
    }));
}

/// The log filter a config asks for ("info" if it cannot be read: `run` reports why).
pub fn log_level(config: &Path) -> String {
    NodeConfig::load(config).map(|c| c.log.level).unwrap_or_else(|_| "info".into())
}

/// `vitgpt2-node run`: runs until SIGTERM/SIGINT or `max_captions`.
///
/// Returns the exit code, 0 after a clean stop. Errors (exit code 2): the config, the model,
/// the spool or the source cannot be opened ([`Error::Config`], [`Error::Bundle`],
/// [`Error::Spool`], [`Error::Source`]…), or a thread failed ([`Error::Thread`], after
/// `offline` was published and the spool flushed).
pub fn run(opts: &RunOptions) -> Result<i32> {
    let mut cfg = NodeConfig::load(&opts.config)?;
    apply_overrides(&mut cfg, opts);

    let stop = Arc::new(AtomicBool::new(false));
    // A second signal ends at once, for a daemon stuck on something.
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop)).map_err(|e| Error::thread("signals", e))?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| Error::thread("signals", e))?;
    }

    let spool = Spool::open(&cfg.spool)?;
    if !spool.is_empty() {
        tracing::info!(spool = spool.len(), dir = %cfg.spool.dir.display(), "spool holds captions from an earlier run: they go first");
    }
    let model = captioning::Model::open(&cfg, &opts.generation)?;
    let source = camera::open(&cfg.source)?;
    tracing::info!(source = %source.describe(), model = %model.info.id, sha256 = %model.info.sha256, "starting");
    capture::warn_if_source_outpaces(&cfg);

    let control = Arc::new(Control { stop: Arc::clone(&stop), ..Default::default() });
    if cfg.broker.enabled {
        broker::start(&cfg.broker, &control)?;
    }
    let mut link = if cfg.mqtt.enabled { Some(mqtt::Link::new(&cfg)?) } else { None };
    let spool = Arc::new(Mutex::new(spool));
    let counters = Arc::new(Counters::default());
    let live = source.live();
    let (frame_tx, frame_rx) = bounded::<capture::Frame>(cfg.schedule.queue);
    let (wake_tx, wake_rx) = bounded::<()>(1);

    let capture = {
        let (control2, counters, rx) = (Arc::clone(&control), Arc::clone(&counters), frame_rx.clone());
        spawn("capture", &control, move || capture::capture_loop(source, frame_tx, rx, &control2, &counters))?
    };
    let captioning = {
        let (control2, counters, spool) = (Arc::clone(&control), Arc::clone(&counters), Arc::clone(&spool));
        let (sched, to_stdout) = (cfg.schedule.clone(), cfg.log.stdout);
        let job = captioning::Job { model, frames: frame_rx, live, sched, to_stdout, wake: wake_tx };
        spawn("caption", &control, move || job.run(&control2, &counters, &spool))?
    };

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    publish::publish_loop(&cfg, link.as_mut(), &spool, &counters, &control, &wake_rx, &|| captioning.is_finished());
    stop.store(true, Relaxed);
    let _ = capture.join();
    let _ = captioning.join();
    let left = lock(&spool).len();
    tracing::info!(captions = counters.captions.load(Relaxed), spool_left = left, "stopped");
    match control.take_failure() {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

fn apply_overrides(cfg: &mut NodeConfig, o: &RunOptions) {
    if let Some(m) = &o.model {
        cfg.model.dir = m.clone();
    }
    if let Some(w) = &o.watch {
        cfg.source.kind = SourceKind::Directory;
        cfg.source.path = Some(w.clone());
    }
    if let Some(h) = &o.host {
        cfg.mqtt.host = h.clone();
    }
    if let Some(p) = o.port {
        cfg.mqtt.port = p;
    }
    if let Some(d) = &o.device_id {
        cfg.mqtt.device_id = d.clone();
    }
    if let Some(s) = &o.spool {
        cfg.spool.dir = s.clone();
    }
    if let Some(i) = o.interval_ms {
        cfg.schedule.interval_ms = i;
    }
    if let Some(n) = o.max_captions {
        cfg.schedule.max_captions = n;
    }
    if o.no_mqtt {
        cfg.mqtt.enabled = false;
    }
}

/// Sleeps `d`, waking early when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Resident memory from /proc, in kB (0 where there is none).
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}
