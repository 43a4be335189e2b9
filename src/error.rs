//! One error type for the library. Every message is a single line that names the thing at fault
//! (a file, an image, a setting, the broker) and, where there is one, the fix; the binaries print
//! it after `error: ` and exit with code 2 (code 1 is "some inputs failed", see the commands).

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of a model bundle (the device's ONNX bundle) is missing, unreadable or
    /// inconsistent with the others.
    #[error("model bundle: {}: {msg}", path.display())]
    Bundle { path: PathBuf, msg: String },

    /// A graph of a bundle uses an operator (or an operator's form) this node cannot run; other
    /// graph sets of the bundle may.
    #[error("model bundle: {}: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },

    /// A file of a training checkpoint (config.json, weights, tokenizer) is missing, unreadable or
    /// does not match the model.
    #[error("checkpoint: {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// An input image could not be read or decoded.
    #[error("image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    /// A setting given on the command line or through an option struct is invalid.
    #[error("invalid setting `{name}`: {msg}")]
    Setting { name: String, msg: String },

    /// A configuration file (node.toml) is invalid; the message starts with `file:line:col:`.
    #[error("{0}")]
    Config(ConfigError),

    /// The inference engine (tract or candle) failed on a model that loaded fine.
    #[error("inference failed in {stage}: {msg}")]
    Runtime { stage: String, msg: String },

    /// A file or folder could not be read, written, created or listed.
    #[error("{}: cannot {action}: {}", path.display(), one_line(&source.to_string()))]
    Io {
        path: PathBuf,
        /// What was attempted: `read`, `write`, `create`, `list`, …
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A value could not be written as JSON/TOML (never silently replaced by an empty file).
    #[error("cannot serialize {what}: {msg}")]
    Serialize { what: String, msg: String },

    /// Where frames come from (camera, watched folder, file list).
    #[error("source: {0}")]
    Source(String),

    /// The MQTT link (TLS set-up, credentials, the broker's answers).
    #[error("mqtt: {0}")]
    Mqtt(String),

    /// The daemon's on-disk spool.
    #[error("spool {}: {msg}", dir.display())]
    Spool { dir: PathBuf, msg: String },

    /// A daemon thread ended abnormally (a panic, or an error it could not recover from).
    #[error("{thread} thread failed: {msg}")]
    Thread { thread: String, msg: String },

    /// A camera frame buffer could not be converted to RGB; `what` names the frame (e.g.
    /// `MJPEG frame`, `YUYV frame 640x480`).
    #[error("{what}: {msg}")]
    Frame { what: String, msg: String },

    /// A value that is wrong in itself, found where no file or setting is known to blame (a word
    /// that is none of a flag's values, a config section that fails its checks, an image's
    /// bytes); callers that know the file or setting wrap the message in the variant naming it.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration error with its position: `file:line:col: field: message`, each part present
/// when known.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub col: Option<usize>,
    /// Dotted field name, e.g. `mqtt.qos`.
    pub field: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.col {
                write!(f, ":{c}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl Error {
    pub fn bundle(path: impl AsRef<Path>, msg: impl fmt::Display) -> Self {
        Error::Bundle { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn checkpoint(path: impl AsRef<Path>, msg: impl fmt::Display) -> Self {
        Error::Checkpoint { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn image(path: impl AsRef<Path>, msg: impl fmt::Display) -> Self {
        Error::Image { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn setting(name: impl Into<String>, msg: impl fmt::Display) -> Self {
        Error::Setting { name: name.into(), msg: one_line(&msg.to_string()) }
    }

    pub fn runtime(stage: impl Into<String>, err: impl fmt::Display) -> Self {
        Error::Runtime { stage: stage.into(), msg: one_line(&err.to_string()) }
    }

    pub fn io(path: impl AsRef<Path>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), action, source }
    }

    pub fn serialize(what: impl Into<String>, err: impl fmt::Display) -> Self {
        Error::Serialize { what: what.into(), msg: one_line(&err.to_string()) }
    }

    pub fn source(msg: impl fmt::Display) -> Self {
        Error::Source(one_line(&msg.to_string()))
    }

    pub fn mqtt(msg: impl fmt::Display) -> Self {
        Error::Mqtt(one_line(&msg.to_string()))
    }

    pub fn frame(what: impl Into<String>, msg: impl fmt::Display) -> Self {
        Error::Frame { what: what.into(), msg: one_line(&msg.to_string()) }
    }

    pub fn thread(thread: impl Into<String>, msg: impl fmt::Display) -> Self {
        Error::Thread { thread: thread.into(), msg: one_line(&msg.to_string()) }
    }

    pub fn spool(dir: impl AsRef<Path>, msg: impl fmt::Display) -> Self {
        Error::Spool { dir: dir.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    /// The same error, blamed on a checkpoint instead of a bundle (assets are shared by both).
    pub fn into_checkpoint(self) -> Self {
        match self {
            Error::Bundle { path, msg } => Error::Checkpoint { path, msg },
            other => other,
        }
    }
}

/// tract reports errors as anyhow chains: keep the whole chain, on one line, without repeats.
pub fn chain(err: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for p in err.chain().map(|e| one_line(&e.to_string())) {
        if !out.iter().any(|o| o.contains(&p)) {
            out.push(p);
        }
    }
    out.join(": ")
}

/// Log lines and CLI errors are one line each (journald, `--json` consumers).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then renamed
/// over `path` (a crash leaves the old file or the new one, never half of one).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates 0600 files; a bundle or a caption file must stay readable by the service
    // user that runs the node, as fs::write would have made it (0666 less the umask).
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, "create a file in", e))?;
    tmp.write_all(bytes).and_then(|_| tmp.as_file().sync_all()).map_err(|e| Error::io(path, "write", e))?;
    tmp.persist(path).map_err(|e| Error::io(path, "write", e.error))?;
    Ok(())
}

/// Pretty JSON with a final newline, written atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::serialize(path.display().to_string(), e))?;
    write_atomic(path, (text + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn atomic_writes_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"{}").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o044, 0o044, "mode {mode:o}: group and others must read it (umask 022)");
    }

    #[test]
    fn config_errors_print_what_is_known() {
        let e = |line, col, field: Option<&str>| ConfigError {
            file: "n.toml".into(),
            line,
            col,
            field: field.map(String::from),
            msg: "bad".into(),
        };
        assert_eq!(e(Some(4), Some(8), Some("mqtt.port")).to_string(), "n.toml:4:8: mqtt.port: bad");
        assert_eq!(e(Some(4), None, Some("mqtt.port")).to_string(), "n.toml:4: mqtt.port: bad");
        assert_eq!(e(None, None, None).to_string(), "n.toml: bad");
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_json(&p, &serde_json::json!({"x": 1})).unwrap();
        write_json(&p, &serde_json::json!({"x": 2})).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\n  \"x\": 2\n}\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        let e = write_atomic(&dir.path().join("no/such/dir/f"), b"x").unwrap_err().to_string();
        assert!(e.contains("no/such/dir") && e.contains("cannot"), "{e}");
    }
}
