//! `vitgpt2-node run` configuration: a TOML file (firmware-config/node.toml documents every
//! field) plus command-line overrides. Errors name the file, the line and the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::bundle::{DtypeChoice, Precision};
use crate::generate::GenerationOverrides;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub source: SourceSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub mqtt: MqttSection,
    #[serde(default)]
    pub spool: SpoolSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub broker: BrokerSection,
}

/// The optional in-process broker (cargo feature `broker`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    #[serde(default)]
    pub enabled: bool,
    /// Address to listen on, e.g. "0.0.0.0:1883".
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_max_payload", deserialize_with = "positive_usize")]
    pub max_payload_bytes: usize,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection { enabled: false, listen: default_listen(), max_payload_bytes: default_max_payload() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:1883".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Bundle directory; relative paths are relative to the config file.
    pub dir: PathBuf,
    /// Short name published with each caption; defaults to the bundle folder's name.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default = "one")]
    pub threads: usize,
    /// The older spelling of `dtype`: auto, fp32 or int8 (any 8-bit form).
    #[serde(default, deserialize_with = "precision")]
    pub precision: Option<Precision>,
    /// Which graphs to run: auto, fp32, fp16, q8, int8, uint8, q4… (transformers.js's dtypes).
    #[serde(default, deserialize_with = "dtype")]
    pub dtype: Option<DtypeChoice>,
    #[serde(default)]
    pub generation: GenerationOverrides,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Camera,
    Directory,
    Files,
    #[default]
    Synthetic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    #[default]
    Mjpeg,
    Yuyv,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    #[serde(default)]
    pub kind: SourceKind,
    /// directory: the folder watched for new images.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// directory: also caption the images already there at start.
    #[serde(default = "yes")]
    pub existing: bool,
    /// directory: how often the folder is listed.
    #[serde(default = "default_poll_ms", deserialize_with = "positive_u64")]
    pub poll_ms: u64,
    /// files: paths or glob patterns (relative to the config file), captioned in order.
    #[serde(default)]
    pub files: Vec<String>,
    /// files/synthetic: start again from the first frame after the last.
    #[serde(default, rename = "loop")]
    pub repeat: bool,
    /// files/synthetic: frames per second produced (the camera has its own `fps`).
    #[serde(default = "default_rate", deserialize_with = "positive_f64")]
    pub rate: f64,
    /// synthetic: number of frames (0 = endless).
    #[serde(default)]
    pub count: u64,
    /// synthetic and camera: frame size.
    #[serde(default = "default_width", deserialize_with = "positive_u32")]
    pub width: u32,
    #[serde(default = "default_height", deserialize_with = "positive_u32")]
    pub height: u32,
    /// camera: V4L2 device index (/dev/videoN).
    #[serde(default)]
    pub device: u32,
    #[serde(default = "default_fps", deserialize_with = "positive_u32")]
    pub fps: u32,
    #[serde(default)]
    pub format: PixelFormat,
}

impl Default for SourceSection {
    fn default() -> Self {
        SourceSection {
            kind: SourceKind::default(),
            path: None,
            existing: true,
            poll_ms: default_poll_ms(),
            files: Vec::new(),
            repeat: false,
            rate: default_rate(),
            count: 0,
            width: default_width(),
            height: default_height(),
            device: 0,
            fps: default_fps(),
            format: PixelFormat::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// At most one caption per interval.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Skip a frame whose mean absolute difference to the last captioned one (0..1) is below
    /// this; 0 turns the gate off.
    #[serde(default, deserialize_with = "unit_f64")]
    pub change_threshold: f64,
    /// Frames waiting between capture and captioning.
    #[serde(default = "two", deserialize_with = "positive_usize")]
    pub queue: usize,
    /// Stop after this many captions (0 = run until stopped).
    #[serde(default)]
    pub max_captions: u64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { interval_ms: default_interval_ms(), change_threshold: 0.0, queue: 2, max_captions: 0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// false: captions go to the spool and the log only.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_host", deserialize_with = "non_empty")]
    pub host: String,
    #[serde(default = "default_port", deserialize_with = "port")]
    pub port: u16,
    /// Fixed client id; defaults to `vitgpt2-<device_id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_prefix", deserialize_with = "topic_part")]
    pub prefix: String,
    #[serde(default = "default_device_id", deserialize_with = "topic_part")]
    pub device_id: String,
    #[serde(default = "one_u8", deserialize_with = "qos")]
    pub qos: u8,
    #[serde(default = "default_keep_alive", deserialize_with = "keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (first line); never logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Seconds between `stats` messages (0 = never).
    #[serde(default = "default_stats_s")]
    pub stats_interval_s: u64,
    #[serde(default = "yes")]
    pub ha_discovery: bool,
    #[serde(default = "default_discovery_prefix", deserialize_with = "topic_part")]
    pub discovery_prefix: String,
    #[serde(default = "default_backoff_min", deserialize_with = "positive_u64")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max", deserialize_with = "positive_u64")]
    pub backoff_max_ms: u64,
    /// Captions sent but not yet acknowledged.
    #[serde(default = "default_window", deserialize_with = "positive_usize")]
    pub inflight: usize,
    /// Larger caption messages are dropped from the spool (logged and counted): a broker
    /// that refuses them would otherwise block the queue forever.
    #[serde(default = "default_max_payload", deserialize_with = "positive_usize")]
    pub max_payload_bytes: usize,
    /// On shutdown, wait this long for the spool to drain.
    #[serde(default = "default_flush_s")]
    pub shutdown_flush_s: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        // One source of defaults: the same as an empty [mqtt] table.
        toml::from_str("").expect("mqtt defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM), for brokers that require them.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync each caption and the folder: survives power loss.
    #[default]
    Always,
    /// Leave it to the OS: survives a crash of the daemon, not of the machine.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSection {
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_spool_max", deserialize_with = "positive_usize")]
    pub max_messages: usize,
    #[serde(default)]
    pub fsync: FsyncPolicy,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection { dir: default_spool_dir(), max_messages: default_spool_max(), fsync: FsyncPolicy::Always }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// tracing filter (`RUST_LOG` wins): error, warn, info, debug.
    #[serde(default = "default_level")]
    pub level: String,
    /// Print each caption's JSON on stdout, one line each.
    #[serde(default = "yes")]
    pub stdout: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: default_level(), stdout: true }
    }
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn one_u8() -> u8 {
    1
}
fn yes() -> bool {
    true
}
fn default_poll_ms() -> u64 {
    200
}
fn default_rate() -> f64 {
    1.0
}
fn default_width() -> u32 {
    640
}
fn default_height() -> u32 {
    480
}
fn default_fps() -> u32 {
    15
}
fn default_interval_ms() -> u64 {
    2000
}
fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "vitgpt2".into()
}
fn default_device_id() -> String {
    "node".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_stats_s() -> u64 {
    60
}
fn default_discovery_prefix() -> String {
    "homeassistant".into()
}
fn default_backoff_min() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_window() -> usize {
    10
}
fn default_max_payload() -> usize {
    64 * 1024
}
fn default_flush_s() -> u64 {
    5
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/vitgpt2/spool")
}
fn default_spool_max() -> usize {
    10_000
}
fn default_level() -> String {
    "info".into()
}

// Checks run while deserializing, so that toml reports the value's position.
fn custom<E: serde::de::Error>(msg: impl std::fmt::Display) -> E {
    E::custom(msg)
}

fn precision<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Precision>, D::Error> {
    String::deserialize(d)?.parse().map(Some).map_err(custom)
}
fn dtype<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DtypeChoice>, D::Error> {
    String::deserialize(d)?.parse().map(Some).map_err(custom)
}
fn positive_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be greater than 0"));
    }
    Ok(v)
}
fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be greater than 0"));
    }
    Ok(v)
}
fn positive_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be greater than 0"));
    }
    Ok(v)
}
fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(custom("must be a number greater than 0"));
    }
    Ok(v)
}
fn unit_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(custom("must be between 0 and 1"));
    }
    Ok(v)
}
fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v > 2 {
        return Err(custom("must be 0, 1 or 2"));
    }
    Ok(v)
}
fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = u16::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be 1..65535"));
    }
    Ok(v)
}
fn keep_alive<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if !(5..=3600).contains(&v) {
        return Err(custom("must be 5..3600 seconds"));
    }
    Ok(v)
}
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v.trim().is_empty() {
        return Err(custom("must not be empty"));
    }
    Ok(v)
}
/// A topic level: no wildcards, no slashes at the ends.
fn topic_part<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v.is_empty() || v.contains(['+', '#', '\0']) || v.starts_with('/') || v.ends_with('/') {
        return Err(custom(format!("`{v}`: must be non-empty, without + # or a leading/trailing /")));
    }
    Ok(v)
}

/// A configuration error, already formatted `file:line:column: field: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

impl NodeConfig {
    /// Reads, parses and checks a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read the config file: {e}", path.display())))?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses and checks config text; `name` is the file name shown in errors.
    pub fn parse(text: &str, name: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| {
            let msg = crate::error::one_line(e.message());
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    match field_at(text, span.start) {
                        Some(field) if !msg.contains(&format!("`{field}`")) => {
                            ConfigError(format!("{name}:{line}:{col}: {field}: {msg}"))
                        }
                        _ => ConfigError(format!("{name}:{line}:{col}: {msg}")),
                    }
                }
                None => ConfigError(format!("{name}: {msg}")),
            }
        })?;
        cfg.check().map_err(|(field, msg)| match find_field(text, &field) {
            Some(line) => ConfigError(format!("{name}:{line}: {field}: {msg}")),
            None => ConfigError(format!("{name}: {field}: {msg}")),
        })?;
        Ok(cfg)
    }

    /// Checks that involve more than one field.
    fn check(&self) -> Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        let s = &self.source;
        match s.kind {
            SourceKind::Directory if s.path.is_none() => return e("source.path", "source.kind = \"directory\" needs the folder to watch: add path = \"/some/dir\""),
            SourceKind::Files if s.files.is_empty() => return e("source.files", "source.kind = \"files\" needs at least one path or glob pattern: files = [\"frames/*.jpg\"]"),
            SourceKind::Camera if !cfg!(feature = "camera") => return e("source.kind", "this build has no camera support: rebuild with the `camera` feature, or use directory/files/synthetic"),
            _ => {}
        }
        if self.broker.enabled {
            if !cfg!(feature = "broker") {
                return e("broker.enabled", "this build has no in-process broker: rebuild with `--features broker`, or use an external broker");
            }
            if self.broker.listen.parse::<std::net::SocketAddr>().is_err() {
                return e("broker.listen", "not an address: use e.g. \"0.0.0.0:1883\"");
            }
        }
        let m = &self.mqtt;
        if m.backoff_max_ms < m.backoff_min_ms {
            return e("mqtt.backoff_max_ms", "must be at least mqtt.backoff_min_ms");
        }
        if m.password_file.is_some() && m.password_env.is_some() {
            return e("mqtt.password_env", "give the password either in password_file or in password_env, not both");
        }
        if (m.password_file.is_some() || m.password_env.is_some()) && m.username.is_none() {
            return e("mqtt.username", "a password needs a user name: add username = \"...\"");
        }
        if let Some(t) = &m.tls {
            if t.client_cert.is_some() != t.client_key.is_some() {
                return e("mqtt.tls.client_key", "client_cert and client_key go together: give both or neither");
            }
        }
        if self.model.dtype.is_some() && self.model.precision.is_some() {
            return e("model.precision", "give either model.dtype or the older model.precision, not both");
        }
        if let Some(id) = &self.model.id {
            if id.trim().is_empty() {
                return e("model.id", "must not be empty");
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return e("log.level", "not a log filter: use error, warn, info or debug");
        }
        if let Some(v) = &self.model.generation.early_stopping {
            if crate::generate::EarlyStopping::parse(v).is_none() {
                return e("model.generation.early_stopping", &format!("`{v}`: use true, false or never"));
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model.dir);
        if let Some(p) = self.source.path.as_mut() {
            fix(p);
        }
        for f in self.source.files.iter_mut() {
            if Path::new(f.as_str()).is_relative() {
                *f = base.join(f.as_str()).to_string_lossy().into_owned();
            }
        }
        fix(&mut self.spool.dir);
        if let Some(p) = self.mqtt.password_file.as_mut() {
            fix(p);
        }
        if let Some(t) = self.mqtt.tls.as_mut() {
            fix(&mut t.ca_file);
            if let Some(p) = t.client_cert.as_mut() {
                fix(p);
            }
            if let Some(p) = t.client_key.as_mut() {
                fix(p);
            }
        }
    }

    /// The graphs `model.dtype` (or the older `model.precision`) asks for.
    pub fn dtype(&self) -> DtypeChoice {
        self.model.dtype.or(self.model.precision.map(DtypeChoice::from)).unwrap_or_default()
    }

    /// Topic for one kind of message: `<prefix>/<device_id>/<leaf>`.
    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{}", self.mqtt.prefix, self.mqtt.device_id, leaf)
    }

    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("vitgpt2-{}", self.mqtt.device_id))
    }

    /// The MQTT password, from its file or variable; `Ok(None)` if none is configured.
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.mqtt.password_file {
            let s = std::fs::read_to_string(p)
                .map_err(|e| format!("mqtt.password_file {}: cannot read it: {e}", p.display()))?;
            return Ok(Some(s.lines().next().unwrap_or("").to_string()));
        }
        if let Some(var) = &self.mqtt.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| format!("mqtt.password_env: the environment variable {var} is not set"));
        }
        Ok(None)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// The dotted key of the `key = value` line holding `offset`, with its table's name.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let key = line.split('=').next()?.trim();
    let key = if line.contains('=') && !key.is_empty() && !key.starts_with('[') { Some(key) } else { None };
    let table = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim().to_string())
    });
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (Some(t), None) if line.trim().starts_with('[') => Some(t),
        _ => None,
    }
}

/// The line of `table.key` (or of its table when the key is absent).
fn find_field(text: &str, field: &str) -> Option<usize> {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    let mut table_line = None;
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') && l.ends_with(']') {
            current = l.trim_matches(['[', ']']).trim().to_string();
            if current == table {
                table_line = Some(i + 1);
            }
            continue;
        }
        if current == table && l.split('=').next().map(str::trim) == Some(key) && l.contains('=') {
            return Some(i + 1);
        }
    }
    table_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_from_spans() {
        let text = "[model]\ndir = \"m\"\n[mqtt]\nport = \"x\"\n";
        let err = NodeConfig::parse(text, "n.toml").unwrap_err().0;
        assert!(err.starts_with("n.toml:4:"), "{err}");
        assert!(err.contains("mqtt.port"), "{err}");
    }
}
