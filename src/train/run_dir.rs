//! A training run's output folder: `checkpoints/step-NNNNNNN/` (weights, optimizer moments,
//! trainer state, assets; `checkpoints/latest` names the newest complete one), `model/` (the
//! final model), `assets/` (tokenizer, processor and generation settings of the run) and
//! `log.jsonl`. Every folder and file is written atomically, so a kill -9 at any moment leaves
//! the previous checkpoint whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::optim::AdamW;
use super::options::TrainerState;
use crate::bundle::contract;
use crate::error::{write_atomic, write_json, Error, Result};
use crate::model::VisionEncoderDecoder;

/// The run's folders under `out`.
pub struct RunDir {
    pub out: PathBuf,
}

impl RunDir {
    pub fn new(out: &Path) -> Self {
        RunDir { out: out.to_path_buf() }
    }

    pub fn assets(&self) -> PathBuf {
        self.out.join("assets")
    }

    pub fn log(&self) -> PathBuf {
        self.out.join("log.jsonl")
    }

    pub fn model(&self) -> PathBuf {
        self.out.join("model")
    }

    fn checkpoints(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// The latest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        let dir = self.checkpoints();
        let name = std::fs::read_to_string(dir.join("latest")).ok()?;
        let p = dir.join(name.trim());
        p.join("trainer_state.json").is_file().then_some(p)
    }

    /// Writes `checkpoints/step-NNNNNNN` (model, assets, optimizer, state), points `latest` at
    /// it and keeps the newest `keep` checkpoints.
    pub fn save_checkpoint(&self, model: &VisionEncoderDecoder, opt: &AdamW, state: &TrainerState, keep: usize) -> Result<PathBuf> {
        let dir = self.checkpoints();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
        let name = format!("step-{:07}", state.step);
        let path = dir.join(&name);
        write_dir_atomic(&path, |tmp| {
            model.save(tmp)?;
            copy_assets(&self.assets(), tmp)?;
            opt.save(&tmp.join("optimizer.safetensors"))?;
            write_json(&tmp.join("trainer_state.json"), state)
        })?;
        write_atomic(&dir.join("latest"), name.as_bytes())?;
        let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, "list", e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        steps.sort();
        for old in steps.iter().rev().skip(keep) {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, "remove", e))?;
        }
        Ok(path)
    }

    /// Writes the final `model/` folder: weights and the run's assets.
    pub fn save_model(&self, model: &VisionEncoderDecoder) -> Result<()> {
        write_dir_atomic(&self.model(), |tmp| {
            model.save(tmp)?;
            copy_assets(&self.assets(), tmp)
        })
    }

    /// Appends one JSON line to `log.jsonl`.
    pub fn append_log(&self, v: &serde_json::Value) -> Result<()> {
        let path = self.log();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, "open", e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(&path, "write", e))
    }

    /// Keeps the log lines up to `step` (a resumed run rewrites what came after).
    pub fn truncate_log(&self, step: u64) -> Result<()> {
        let path = self.log();
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s <= step))
            .collect();
        write_atomic(&path, (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes())
    }
}

/// Copies the asset files (tokenizer, processor, generation settings) that `from` has into `to`.
pub fn copy_assets(from: &Path, to: &Path) -> Result<()> {
    for name in contract::ASSET_FILES {
        let p = from.join(name);
        if p.is_file() {
            std::fs::copy(&p, to.join(name)).map_err(|e| Error::io(to.join(name), "write", e))?;
        }
    }
    Ok(())
}

/// Writes `dir` atomically: `fill` fills a temporary folder next to it, whose files are synced,
/// then it takes `dir`'s place (the old one is removed after the swap).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "create", e))?;
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempdir_in(parent).map_err(|e| Error::io(parent, "create a folder in", e))?;
    fill(tmp.path())?;
    for entry in std::fs::read_dir(tmp.path()).map_err(|e| Error::io(tmp.path(), "list", e))?.flatten() {
        std::fs::File::open(entry.path()).and_then(|f| f.sync_all()).map_err(|e| Error::io(entry.path(), "sync", e))?;
    }
    let tmp = tmp.keep();
    if dir.exists() {
        let old = tempfile::Builder::new().prefix(".old-").tempdir_in(parent).map_err(|e| Error::io(parent, "create a folder in", e))?;
        let old_dir = old.path().join("d");
        std::fs::rename(dir, &old_dir).map_err(|e| Error::io(dir, "replace", e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, "write", e))?;
        // `old` (and the previous folder inside it) is removed when it goes out of scope.
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, "write", e))?;
    }
    Ok(())
}
