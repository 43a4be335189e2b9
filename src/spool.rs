//! The on-disk spool: every caption is written here before it is sent, and removed only when
//! the broker has acknowledged it, so neither a broker restart nor a daemon restart loses one.
//!
//! One file per message, named by a zero-padded sequence number: appending is write to a
//! temporary name + rename (a crash never leaves half a message), removing is unlink, and
//! replay is a sorted listing. Captions come at most a few per second, so this is plenty.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::node_config::FsyncPolicy;

pub struct Spool {
    dir: PathBuf,
    max: usize,
    fsync: FsyncPolicy,
    /// Ids on disk, oldest first, with payload sizes.
    ids: BTreeMap<u64, usize>,
    next_id: u64,
    /// Oldest messages dropped because the spool was full.
    pub dropped: u64,
}

const EXT: &str = "msg";

impl Spool {
    /// Opens (creating it if needed) the spool folder and lists what an earlier run left.
    pub fn open(dir: &Path, max: usize, fsync: FsyncPolicy) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("spool {}: cannot create it: {e} (set spool.dir to a writable folder)", dir.display()))?;
        let mut ids = BTreeMap::new();
        let rd = fs::read_dir(dir).map_err(|e| format!("spool {}: cannot list it: {e}", dir.display()))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                // A write that a crash interrupted: it was never acknowledged to anyone.
                let _ = fs::remove_file(&p);
                continue;
            }
            if let Some(id) = name.strip_suffix(&format!(".{EXT}")).and_then(|s| s.parse::<u64>().ok()) {
                ids.insert(id, entry.metadata().map(|m| m.len() as usize).unwrap_or(0));
            }
        }
        let next_id = ids.keys().next_back().map(|i| i + 1).unwrap_or(1);
        let probe = dir.join(".write-test.tmp");
        fs::write(&probe, b"").map_err(|e| format!("spool {}: not writable: {e}", dir.display()))?;
        let _ = fs::remove_file(&probe);
        Ok(Spool { dir: dir.to_path_buf(), max, fsync, ids, next_id, dropped: 0 })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.{EXT}"))
    }

    /// Stores a message; returns its id. A full spool drops its oldest message first.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, String> {
        while self.ids.len() >= self.max {
            if let Some((&old, _)) = self.ids.iter().next() {
                self.remove(old);
                self.dropped += 1;
                tracing::warn!(id = old, max = self.max, "spool full: oldest caption dropped");
            }
        }
        let id = self.next_id;
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(payload)?;
            if self.fsync == FsyncPolicy::Always {
                f.sync_all()?;
            }
            fs::rename(&tmp, self.path(id))?;
            if self.fsync == FsyncPolicy::Always {
                // The rename is durable only once the folder is.
                fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("spool {}: cannot write a caption: {e}", self.dir.display()))?;
        self.next_id += 1;
        self.ids.insert(id, payload.len());
        Ok(id)
    }

    /// Forgets an acknowledged (or undeliverable) message.
    pub fn remove(&mut self, id: u64) {
        if self.ids.remove(&id).is_some() {
            if let Err(e) = fs::remove_file(self.path(id)) {
                tracing::warn!(id, error = %e, "spool: cannot remove an acknowledged caption");
            }
        }
    }

    pub fn read(&self, id: u64) -> Option<Vec<u8>> {
        fs::read(self.path(id)).ok()
    }

    /// The first id after `after` still in the spool (replay order).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        self.ids.range(after + 1..).next().map(|(id, _)| *id)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_remove_replay_and_drop_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 3, FsyncPolicy::Always).unwrap();
        let ids: Vec<u64> = (0..4).map(|i| s.append(format!("m{i}").as_bytes()).unwrap()).collect();
        assert_eq!(s.len(), 3);
        assert_eq!(s.dropped, 1);
        assert!(!s.contains(ids[0]), "the oldest is dropped when full");
        s.remove(ids[2]);
        // A crash mid-write leaves a .tmp file: ignored and cleaned on open.
        fs::write(dir.path().join("00000000000000000099.tmp"), b"half").unwrap();
        let s2 = Spool::open(dir.path(), 3, FsyncPolicy::Never).unwrap();
        assert_eq!(s2.next_after(0), Some(ids[1]));
        assert_eq!(s2.next_after(ids[1]), Some(ids[3]));
        assert_eq!(s2.read(ids[3]).unwrap(), b"m3");
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        let mut s2 = s2;
        assert_eq!(s2.append(b"x").unwrap(), ids[3] + 1, "ids keep growing across restarts");
    }
}
