//! One error type for the library. Every message is a single line that names the thing
//! at fault (a file, an image, a setting) and, where there is one, the fix.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the model bundle is missing, unreadable or inconsistent with the others.
    #[error("model bundle: {}: {msg}", path.display())]
    Bundle { path: PathBuf, msg: String },

    /// An input image could not be read or decoded.
    #[error("image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    /// A setting given on the command line or in a configuration file is invalid.
    #[error("invalid setting `{name}`: {msg}")]
    Setting { name: String, msg: String },

    /// The inference engine failed while running a graph that loaded fine.
    #[error("inference failed in {stage}: {msg}")]
    Runtime { stage: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bundle(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Bundle { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn image(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Image { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn setting(name: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Setting { name: name.into(), msg: one_line(&msg.to_string()) }
    }

    pub fn runtime(stage: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Runtime { stage: stage.into(), msg: one_line(&err.to_string()) }
    }
}

/// tract reports errors as anyhow chains: keep the whole chain, on one line.
pub fn chain(err: &anyhow::Error) -> String {
    let parts: Vec<String> = err.chain().map(|e| one_line(&e.to_string())).collect();
    let mut out: Vec<String> = Vec::new();
    for p in parts {
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
