//! `vitgpt2-node check-config FILE`: a pre-deploy lint of a node configuration.
//!
//! Every field is checked (an invalid one is an error, exit code 2, one line
//! `file:line:col: field: problem`). Paths that do not exist on this machine are warnings
//! (exit 0): the file may be meant for another one. `--strict` — what the systemd unit runs
//! before each start — also opens what `run` will open (the model bundle, the spool folder,
//! the password, the TLS files, the camera or the watched folder) and fails on any of them.

use std::path::{Path, PathBuf};

use super::camera;
use super::capture::source_outpaces;
use super::config::{NodeConfig, SourceKind};
use super::{captioning, spool};
use crate::error::Result;

/// `vitgpt2-node check-config` options.
#[derive(Debug, Clone, Default)]
pub struct CheckConfigOptions {
    /// The node.toml to check.
    pub file: PathBuf,
    /// Also open the model bundle, spool, password, TLS files and camera; fail on any of them.
    pub strict: bool,
}

/// Runs the check, printing `warning: …` and `error: …` lines on stderr and `FILE: ok` on
/// stdout. Returns the exit code: 0 (warnings allowed), 2 when a `--strict` check failed.
///
/// Errors (exit code 2): the file cannot be read or a field is invalid ([`crate::Error::Config`]).
pub fn check_config(opts: &CheckConfigOptions) -> Result<i32> {
    let cfg = NodeConfig::load(&opts.file)?;
    let file = opts.file.display();
    let warnings = lint(&cfg, !opts.strict);
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    if opts.strict {
        errors = open_everything(&cfg, &mut notes);
    }
    for n in &notes {
        println!("{file}: {n}");
    }
    for w in &warnings {
        eprintln!("warning: {file}: {w}");
    }
    for e in &errors {
        eprintln!("error: {file}: {e}");
    }
    if !errors.is_empty() {
        return Ok(2);
    }
    match warnings.len() {
        0 => println!("{file}: ok"),
        n => println!("{file}: ok ({n} warning{})", if n == 1 { "" } else { "s" }),
    }
    Ok(0)
}

/// Checks that need nothing opened; with `paths`, also paths missing on this machine.
fn lint(cfg: &NodeConfig, paths: bool) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(msg) = source_outpaces(cfg) {
        w.push(msg);
    }
    if !paths {
        return w;
    }
    let m = &cfg.model.dir;
    w.extend(missing("model.dir", m, ""));
    if m.is_dir() && !m.join("config.json").is_file() {
        w.push(format!("model.dir: {} has no config.json: is it a model bundle?", m.display()));
    }
    match cfg.source.kind {
        SourceKind::Directory => {
            if let Some(p) = &cfg.source.path {
                w.extend(missing("source.path", p, " (waited for at start)"));
            }
        }
        SourceKind::Files => {
            if let Err(e) = camera::FilesSource::new(&cfg.source.files, false, 1.0) {
                w.push(e.to_string());
            }
        }
        SourceKind::Camera => w.extend(missing("source.device", Path::new(&format!("/dev/video{}", cfg.source.device)), "")),
        SourceKind::Synthetic => {}
    }
    // The daemon creates the spool folder itself, but not a missing parent.
    if !cfg.spool.dir.exists() && !cfg.spool.dir.parent().is_some_and(Path::is_dir) {
        w.push(format!(
            "spool.dir: {} does not exist on this machine, nor its parent (under systemd, StateDirectory=vitgpt2 makes /var/lib/vitgpt2)",
            cfg.spool.dir.display()
        ));
    }
    let mq = &cfg.mqtt;
    if mq.enabled {
        if let Some(p) = &mq.password_file {
            w.extend(missing("mqtt.password_file", p, ""));
        }
        if let Some(v) = &mq.password_env {
            if std::env::var_os(v).is_none() {
                w.push(format!("mqtt.password_env: {v} is not set here"));
            }
        }
        if let Some(t) = &mq.tls {
            w.extend(missing("mqtt.tls.ca_file", &t.ca_file, ""));
            for (field, p) in [("mqtt.tls.client_cert", &t.client_cert), ("mqtt.tls.client_key", &t.client_key)] {
                if let Some(p) = p {
                    w.extend(missing(field, p, ""));
                }
            }
        }
    }
    w
}

fn missing(field: &str, p: &Path, what: &str) -> Option<String> {
    (!p.exists()).then(|| format!("{field}: {} does not exist on this machine{what}", p.display()))
}

/// `--strict`: opens everything `run` opens; returns one line per failure.
fn open_everything(cfg: &NodeConfig, notes: &mut Vec<String>) -> Vec<String> {
    let mut errors = Vec::new();
    match captioning::check_model(cfg) {
        Ok(what) => notes.push(format!("model {} loads ({what})", cfg.model.dir.display())),
        Err(e) => errors.push(format!("model.dir: {e}")),
    }
    if let Err(e) = spool::check_writable(&cfg.spool.dir) {
        errors.push(format!("spool.dir: {e}"));
    }
    match cfg.source.kind {
        SourceKind::Camera => match camera::probe_camera(&cfg.source) {
            Ok(mode) => notes.push(format!("camera /dev/video{} opened, mode {mode}", cfg.source.device)),
            Err(e) => errors.push(format!("source.device: {e}")),
        },
        SourceKind::Directory => {
            if let Some(p) = &cfg.source.path {
                if let Err(e) = std::fs::read_dir(p) {
                    errors.push(format!("source.path: {}: cannot list it: {e}", p.display()));
                }
            }
        }
        SourceKind::Files => {
            if let Err(e) = camera::open(&cfg.source) {
                errors.push(e.to_string());
            }
        }
        SourceKind::Synthetic => {}
    }
    let mq = &cfg.mqtt;
    if mq.enabled {
        if let Err(e) = cfg.password() {
            errors.push(e.to_string());
        }
        if let Some(t) = &mq.tls {
            for (field, p) in [("mqtt.tls.ca_file", Some(&t.ca_file)), ("mqtt.tls.client_cert", t.client_cert.as_ref()), ("mqtt.tls.client_key", t.client_key.as_ref())] {
                if let Some(p) = p {
                    if let Err(e) = std::fs::read(p) {
                        errors.push(format!("{field}: {}: cannot read it: {e}", p.display()));
                    }
                }
            }
        }
    }
    errors
}
