//! `vitgpt2-node run` configuration: a TOML file (firmware-config/node.toml documents every
//! field) plus command-line overrides. Errors name the file, the line and the field
//! ([`crate::error::ConfigError`]: `file:line:col: field: problem`).
//!
//! Each section's defaults live in its `Default` impl (serde fills absent fields from it);
//! value checks run while deserializing (see [`super::config_parse`]) so that toml reports
//! their position.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config_parse::{
    keep_alive, non_empty, non_empty_opt, port, positive_f64, positive_u32, positive_u64, positive_usize, precision, dtype, qos, topic_part,
    unit_f64,
};
use crate::bundle::{DtypeChoice, Precision};
use crate::generate::GenerationOverrides;
use crate::error::{Error, Result};

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
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    pub enabled: bool,
    /// Address to listen on, e.g. "0.0.0.0:1883".
    pub listen: String,
    /// Largest message it accepts, in bytes.
    #[serde(deserialize_with = "positive_usize")]
    pub max_payload_bytes: usize,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection { enabled: false, listen: "127.0.0.1:1883".into(), max_payload_bytes: 64 * 1024 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Bundle directory; relative paths are relative to the config file.
    pub dir: PathBuf,
    /// Short name published with each caption; defaults to the bundle folder's name.
    #[serde(default)]
    pub id: Option<String>,
    /// Threads for tract's matrix products.
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

fn one() -> usize {
    1
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
#[serde(deny_unknown_fields, default)]
pub struct SourceSection {
    pub kind: SourceKind,
    /// directory: the folder watched for new images.
    pub path: Option<PathBuf>,
    /// directory: also caption the images already there at start.
    pub existing: bool,
    /// directory: how often the folder is listed, in milliseconds.
    #[serde(deserialize_with = "positive_u64")]
    pub poll_ms: u64,
    /// directory: a file is taken once its size and modification time have not changed for
    /// this many milliseconds (0: unchanged over one poll), so half-written files are not read.
    pub settle_ms: u64,
    /// files: paths or glob patterns (relative to the config file), captioned in order.
    pub files: Vec<String>,
    /// files/synthetic: start again from the first frame after the last.
    #[serde(rename = "loop")]
    pub repeat: bool,
    /// files/synthetic: frames per second produced (the camera has its own `fps`).
    #[serde(deserialize_with = "positive_f64")]
    pub rate: f64,
    /// synthetic: number of frames (0 = endless).
    pub count: u64,
    /// synthetic and camera: frame size in pixels.
    #[serde(deserialize_with = "positive_u32")]
    pub width: u32,
    #[serde(deserialize_with = "positive_u32")]
    pub height: u32,
    /// camera: V4L2 device index (/dev/videoN).
    pub device: u32,
    /// camera: frames per second asked of the driver.
    #[serde(deserialize_with = "positive_u32")]
    pub fps: u32,
    pub format: PixelFormat,
}

impl Default for SourceSection {
    fn default() -> Self {
        SourceSection {
            kind: SourceKind::default(),
            path: None,
            existing: true,
            poll_ms: 200,
            settle_ms: 1000,
            files: Vec::new(),
            repeat: false,
            rate: 1.0,
            count: 0,
            width: 640,
            height: 480,
            device: 0,
            fps: 15,
            format: PixelFormat::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// At most one caption per interval, in milliseconds.
    pub interval_ms: u64,
    /// Skip a frame whose mean absolute difference to the last captioned one (0..1) is below
    /// this; 0 turns the gate off.
    #[serde(deserialize_with = "unit_f64")]
    pub change_threshold: f64,
    /// Frames waiting between capture and captioning.
    #[serde(deserialize_with = "positive_usize")]
    pub queue: usize,
    /// Stop after this many captions (0 = run until stopped).
    pub max_captions: u64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { interval_ms: 2000, change_threshold: 0.0, queue: 2, max_captions: 0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// false: captions go to the spool and the log only.
    pub enabled: bool,
    /// "3.1.1" or "5".
    pub version: MqttVersion,
    #[serde(deserialize_with = "non_empty")]
    pub host: String,
    #[serde(deserialize_with = "port")]
    pub port: u16,
    /// Fixed client id; defaults to `vitgpt2-<device_id>`.
    #[serde(deserialize_with = "non_empty_opt")]
    pub client_id: Option<String>,
    #[serde(deserialize_with = "topic_part")]
    pub prefix: String,
    #[serde(deserialize_with = "topic_part")]
    pub device_id: String,
    /// QoS of caption messages (0, 1 or 2).
    #[serde(deserialize_with = "qos")]
    pub qos: u8,
    /// MQTT keep alive, in seconds.
    #[serde(deserialize_with = "keep_alive")]
    pub keep_alive_s: u64,
    pub username: Option<String>,
    /// File holding the password (first line); never logged.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    pub tls: Option<TlsSection>,
    /// Seconds between `stats` messages (0 = never).
    pub stats_interval_s: u64,
    pub ha_discovery: bool,
    #[serde(deserialize_with = "topic_part")]
    pub discovery_prefix: String,
    /// Reconnect backoff bounds, in milliseconds.
    #[serde(deserialize_with = "positive_u64")]
    pub backoff_min_ms: u64,
    #[serde(deserialize_with = "positive_u64")]
    pub backoff_max_ms: u64,
    /// Captions sent but not yet acknowledged.
    #[serde(deserialize_with = "positive_usize")]
    pub inflight: usize,
    /// Larger caption messages are set aside in the spool's dead-letter folder (logged and
    /// counted): a broker that refuses them would otherwise block the queue forever.
    #[serde(deserialize_with = "positive_usize")]
    pub max_payload_bytes: usize,
    /// Largest packet taken from the broker, in bytes; a bigger one (e.g. a retained blob on
    /// the command topic) ends the connection, so this is generous.
    #[serde(deserialize_with = "positive_usize")]
    pub max_incoming_bytes: usize,
    /// A message after which the broker closed the connection this many times in a row is
    /// refused: captions go to the dead-letter folder, other messages are dropped.
    #[serde(deserialize_with = "positive_u32")]
    pub dead_letter_after: u32,
    /// On shutdown, wait this long (seconds) for the spool to drain.
    pub shutdown_flush_s: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            enabled: true,
            version: MqttVersion::V311,
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            prefix: "vitgpt2".into(),
            device_id: "node".into(),
            qos: 1,
            keep_alive_s: 30,
            username: None,
            password_file: None,
            password_env: None,
            tls: None,
            stats_interval_s: 60,
            ha_discovery: true,
            discovery_prefix: "homeassistant".into(),
            backoff_min_ms: 500,
            backoff_max_ms: 30_000,
            inflight: 10,
            max_payload_bytes: 64 * 1024,
            max_incoming_bytes: 1024 * 1024,
            dead_letter_after: 3,
            shutdown_flush_s: 5,
        }
    }
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum MqttVersion {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// The broker states its maximum packet size in CONNACK and why it refuses a message.
    #[serde(rename = "5")]
    V5,
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
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    pub dir: PathBuf,
    /// Captions kept on disk; when full, the oldest is dropped and counted.
    #[serde(deserialize_with = "positive_usize")]
    pub max_messages: usize,
    /// Captions kept in memory while the disk refuses writes (full, read-only); when full,
    /// the oldest is dropped and counted.
    #[serde(deserialize_with = "positive_usize")]
    pub memory_max_messages: usize,
    pub fsync: FsyncPolicy,
    /// false: captions an earlier run left are deleted at start instead of sent (demos only).
    pub replay: bool,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: PathBuf::from("/var/lib/vitgpt2/spool"),
            max_messages: 10_000,
            memory_max_messages: 1000,
            fsync: FsyncPolicy::Always,
            replay: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// tracing filter (`RUST_LOG` wins): error, warn, info, debug.
    pub level: String,
    /// Print each caption's JSON on stdout, one line each.
    pub stdout: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: "info".into(), stdout: true }
    }
}

impl NodeConfig {
    /// Reads, parses and checks a config file; relative paths become relative to its folder.
    ///
    /// Errors: [`Error::Config`] (`file: cannot read the config file: …` or
    /// `file:line:col: field: problem`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| super::config_parse::unpositioned(path, format!("cannot read the config file: {e}")))?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses and checks config text; `name` is the file name shown in errors.
    ///
    /// Errors: [`Error::Config`] with the position of the offending value.
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| Error::Config(super::config_parse::toml_error(text, name, &e)))?;
        cfg.check().map_err(|(field, msg)| Error::Config(super::config_parse::field_error(text, name, &field, msg)))?;
        Ok(cfg)
    }

    /// Checks that involve more than one field: `Err((field, problem))`.
    fn check(&self) -> std::result::Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        let s = &self.source;
        match s.kind {
            SourceKind::Directory if s.path.is_none() => return e("source.path", "source.kind = \"directory\" needs the folder to watch: add path = \"/some/dir\""),
            SourceKind::Files if s.files.is_empty() => return e("source.files", "source.kind = \"files\" needs at least one path or glob pattern: files = [\"frames/*.jpg\"]"),
            SourceKind::Camera if !cfg!(feature = "camera") => return e("source.kind", "this build has no camera support: rebuild with the `camera` feature, or use directory/files/synthetic"),
            _ => {}
        }
        if self.model.dtype.is_some() && self.model.precision.is_some() {
            return e("model.precision", "give either model.dtype or the older model.precision, not both");
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

    /// The MQTT client identifier: `mqtt.client_id`, or `vitgpt2-<device_id>`.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("vitgpt2-{}", self.mqtt.device_id))
    }

    /// The MQTT password, from its file (first line) or environment variable; `Ok(None)` if
    /// none is configured.
    ///
    /// Errors: [`Error::Io`] when the file cannot be read, [`Error::Setting`] when the
    /// variable is not set. The password itself never appears in an error.
    pub fn password(&self) -> Result<Option<String>> {
        if let Some(p) = &self.mqtt.password_file {
            let s = std::fs::read_to_string(p).map_err(|e| Error::io(p, "read mqtt.password_file", e))?;
            return Ok(Some(s.lines().next().unwrap_or("").to_string()));
        }
        if let Some(var) = &self.mqtt.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| Error::setting("mqtt.password_env", format!("the environment variable {var} is not set")));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_from_spans() {
        let text = "[model]\ndir = \"m\"\n[mqtt]\nport = \"x\"\n";
        let err = NodeConfig::parse(text, "n.toml").unwrap_err().to_string();
        assert!(err.starts_with("n.toml:4:"), "{err}");
        assert!(err.contains("mqtt.port"), "{err}");
    }

    #[test]
    fn defaults_are_those_of_an_empty_table() {
        let cfg = NodeConfig::parse("[model]\ndir = \"m\"\n[mqtt]\n[source]\n[spool]\n", "n.toml").unwrap();
        assert_eq!(cfg.mqtt.port, 1883);
        assert_eq!(cfg.mqtt.dead_letter_after, 3);
        assert_eq!(cfg.source.settle_ms, 1000);
        assert!(cfg.spool.replay);
        let err = NodeConfig::parse("[model]\ndir = \"m\"\n[mqtt]\nclient_id = \"\"\n", "n.toml").unwrap_err().to_string();
        assert!(err.starts_with("n.toml:4:") && err.contains("mqtt.client_id"), "{err}");
    }
}
