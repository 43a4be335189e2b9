//! The spool: every caption is stored here before it is sent, and removed only when the broker
//! has acknowledged it, so neither a broker restart nor a daemon restart loses one.
//!
//! One file per message, named by a zero-padded sequence number: appending is write to a
//! temporary name + rename (a crash never leaves half a message), removing is unlink, and
//! replay is a sorted listing. Captions come at most a few per second, so this is plenty.
//!
//! When the disk refuses writes (full, read-only, quota), captions are kept in a bounded
//! memory queue under the same ids — they are still published — and written to disk as soon
//! as it takes them again. Nothing is ever lost without being counted ([`Spool::dropped`]).
//! Messages the broker can never take are moved to `<dir>/dead-letter/` instead of deleted.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::node::config::{FsyncPolicy, SpoolSection};

const EXT: &str = "msg";
/// Subfolder for messages the broker refused.
pub const DEAD_LETTER: &str = "dead-letter";
/// How often captions held in memory are offered to the disk again when nothing new comes.
const RETRY_EVERY: Duration = Duration::from_secs(2);

enum Entry {
    /// On disk.
    Disk,
    /// Held in memory because the disk refused it.
    Memory(Vec<u8>),
}

/// The spool of one daemon (see the module documentation); one writer, shared behind a mutex.
pub struct Spool {
    dir: PathBuf,
    max: usize,
    memory_max: usize,
    fsync: FsyncPolicy,
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    dropped: u64,
    write_errors: u64,
    dead_lettered: u64,
    /// Why the disk refuses writes, while it does (one log line per episode).
    failing: Option<String>,
    last_retry: Option<Instant>,
    /// A warning about dropping the oldest was logged in this episode of a full spool.
    full_logged: bool,
}

/// What the spool has done, for `…/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolCounts {
    /// Captions waiting (on disk and in memory).
    pub depth: usize,
    /// Of those, held in memory because the disk refused them.
    pub memory: usize,
    /// Captions given up: the oldest, dropped when the spool was full; unreadable files.
    pub dropped: u64,
    /// Caption writes the disk refused (each then kept in memory).
    pub write_errors: u64,
    /// Captions moved to the dead-letter folder.
    pub dead_lettered: u64,
}

fn is_storage_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), StorageFull | QuotaExceeded | FileTooLarge | ReadOnlyFilesystem)
}

impl Spool {
    /// Opens (creating it if needed) the spool folder and lists what an earlier run left.
    /// With `cfg.replay == false` that is deleted instead (logged with its count).
    ///
    /// A disk that is full or read-only is not an error: captions wait in memory until it
    /// takes them (logged). Errors: [`Error::Spool`] when the folder cannot be created or listed.
    pub fn open(cfg: &SpoolSection) -> Result<Self> {
        let dir = cfg.dir.as_path();
        fs::create_dir_all(dir).map_err(|e| Error::spool(dir, format!("cannot create it: {e} (set spool.dir to a writable folder)")))?;
        let mut entries = BTreeMap::new();
        let rd = fs::read_dir(dir).map_err(|e| Error::spool(dir, format!("cannot list it: {e}")))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                // A write that a crash or a full disk interrupted: never acknowledged to anyone.
                let _ = fs::remove_file(&p);
                continue;
            }
            if let Some(id) = name.strip_suffix(&format!(".{EXT}")).and_then(|s| s.parse::<u64>().ok()) {
                entries.insert(id, Entry::Disk);
            }
        }
        let next_id = entries.keys().next_back().map(|i| i + 1).unwrap_or(1);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max: cfg.max_messages,
            memory_max: cfg.memory_max_messages,
            fsync: cfg.fsync,
            entries,
            next_id,
            dropped: 0,
            write_errors: 0,
            dead_lettered: 0,
            failing: None,
            last_retry: None,
            full_logged: false,
        };
        if !cfg.replay && !spool.entries.is_empty() {
            let n = spool.entries.len();
            for id in spool.entries.keys().copied().collect::<Vec<_>>() {
                spool.remove(id);
            }
            tracing::info!(captions = n, dir = %dir.display(), "spool: captions from an earlier run deleted (spool.replay = false)");
        }
        if let Err(e) = probe(dir) {
            if !is_storage_full(&e) {
                return Err(Error::spool(dir, format!("not writable: {e}")));
            }
            spool.disk_failed(&e);
        }
        Ok(spool)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.{EXT}"))
    }

    /// Stores a message and returns its id. Never fails: a disk that refuses the write gets it
    /// later, meanwhile it is kept in memory. A full spool (or memory queue) drops its oldest
    /// message first, counted in [`SpoolCounts::dropped`].
    pub fn append(&mut self, payload: Vec<u8>) -> u64 {
        while self.entries.len() >= self.max {
            self.drop_oldest(|_| true, "spool full (spool.max_messages)");
        }
        let id = self.next_id;
        self.next_id += 1;
        self.flush_memory();
        if self.failing.is_none() {
            match self.write(id, &payload) {
                Ok(()) => {
                    self.entries.insert(id, Entry::Disk);
                    return id;
                }
                Err(e) => self.disk_failed(&e),
            }
        }
        self.write_errors += 1;
        if self.memory_len() >= self.memory_max {
            self.drop_oldest(|e| matches!(e, Entry::Memory(_)), "disk refuses writes and the memory queue is full (spool.memory_max_messages)");
        }
        self.entries.insert(id, Entry::Memory(payload));
        id
    }

    /// Offers the captions held in memory to the disk again (at most every 2 s); called by the
    /// publisher so that they reach the disk even when no new caption comes.
    pub fn retry_disk(&mut self) {
        if self.failing.is_some() && self.last_retry.is_none_or(|t| t.elapsed() >= RETRY_EVERY) {
            self.flush_memory();
        }
    }

    fn flush_memory(&mut self) {
        if self.failing.is_none() && self.memory_len() == 0 {
            return;
        }
        self.last_retry = Some(Instant::now());
        let ids: Vec<u64> = self.entries.iter().filter(|(_, e)| matches!(e, Entry::Memory(_))).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(Entry::Memory(payload)) = self.entries.get(&id) else { continue };
            match self.write(id, payload) {
                Ok(()) => {
                    self.entries.insert(id, Entry::Disk);
                }
                Err(e) => {
                    self.disk_failed(&e);
                    return;
                }
            }
        }
        if self.failing.is_none() {
            return;
        }
        // Nothing was in memory: probe with an empty file.
        if let Err(e) = probe(&self.dir) {
            self.disk_failed(&e);
            return;
        }
        tracing::info!(dir = %self.dir.display(), "spool: the disk takes writes again; captions held in memory are on disk now");
        self.failing = None;
    }

    fn disk_failed(&mut self, e: &std::io::Error) {
        if self.failing.is_none() {
            tracing::error!(
                dir = %self.dir.display(),
                error = %crate::error::one_line(&e.to_string()),
                memory_max = self.memory_max,
                "spool: the disk refuses writes; captions are kept in memory (still published) until it takes them again"
            );
        }
        self.failing = Some(e.to_string());
    }

    fn write(&self, id: u64, payload: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        let result = (|| {
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
        })();
        if result.is_err() {
            // A full disk leaves the temporary file half written.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn drop_oldest(&mut self, which: impl Fn(&Entry) -> bool, why: &str) {
        let Some(old) = self.entries.iter().find(|(_, e)| which(e)).map(|(id, _)| *id) else { return };
        self.forget(old);
        self.dropped += 1;
        if !self.full_logged {
            tracing::warn!(id = old, "{why}: oldest caption dropped (counted in spool_dropped; logged once per episode)");
            self.full_logged = true;
        }
    }

    /// Forgets an acknowledged message.
    pub fn remove(&mut self, id: u64) {
        self.forget(id);
        // A full spool's episode ends once there is room again.
        if self.entries.len() < self.max && self.memory_len() < self.memory_max {
            self.full_logged = false;
        }
    }

    fn forget(&mut self, id: u64) {
        if let Some(Entry::Disk) = self.entries.remove(&id) {
            if let Err(e) = fs::remove_file(self.path(id)) {
                // It comes back after a restart: a duplicate, never a loss (ids tell them apart).
                tracing::debug!(id, error = %e, "spool: cannot remove an acknowledged caption");
            }
        }
    }

    /// Gives up a message that cannot be read (its file vanished or is unreadable): counted
    /// in [`SpoolCounts::dropped`] and logged.
    pub fn discard(&mut self, id: u64, err: &Error) {
        if self.entries.remove(&id).is_some() {
            self.dropped += 1;
            tracing::error!(id, error = %err, "spool: caption unreadable, given up (counted in spool_dropped)");
        }
    }

    /// Moves a message the broker cannot take to `<dir>/dead-letter/<id>.msg` and returns
    /// that path. If even that fails, the message leaves the queue anyway (counted in
    /// `dropped`; a file on disk stays where it is and comes back after a restart) and the
    /// error is returned.
    pub fn dead_letter(&mut self, id: u64) -> Result<PathBuf> {
        let dir = self.dir.join(DEAD_LETTER);
        let dest = dir.join(format!("{id:020}.{EXT}"));
        let moved = match self.entries.get(&id) {
            None => return Err(Error::spool(&self.dir, format!("no caption {id}"))),
            Some(Entry::Disk) => fs::create_dir_all(&dir).and_then(|_| fs::rename(self.path(id), &dest)),
            Some(Entry::Memory(p)) => fs::create_dir_all(&dir).and_then(|_| fs::write(&dest, p)),
        };
        self.entries.remove(&id);
        match moved {
            Ok(()) => {
                self.dead_lettered += 1;
                Ok(dest)
            }
            Err(e) => {
                self.dropped += 1;
                Err(Error::io(&dest, "write a dead letter", e))
            }
        }
    }

    /// A message's payload.
    ///
    /// Errors: [`Error::Io`] when its file cannot be read; [`Error::Spool`] for an unknown id.
    pub fn read(&self, id: u64) -> Result<Vec<u8>> {
        match self.entries.get(&id) {
            Some(Entry::Memory(p)) => Ok(p.clone()),
            Some(Entry::Disk) => fs::read(self.path(id)).map_err(|e| Error::io(self.path(id), "read", e)),
            None => Err(Error::spool(&self.dir, format!("no caption {id}"))),
        }
    }

    /// The first id after `after` still in the spool (replay order).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        self.entries.range(after + 1..).next().map(|(id, _)| *id)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// Captions waiting, on disk and in memory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn memory_len(&self) -> usize {
        self.entries.values().filter(|e| matches!(e, Entry::Memory(_))).count()
    }

    /// The spool's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn counts(&self) -> SpoolCounts {
        SpoolCounts {
            depth: self.entries.len(),
            memory: self.memory_len(),
            dropped: self.dropped,
            write_errors: self.write_errors,
            dead_lettered: self.dead_lettered,
        }
    }
}

/// Whether the folder takes a new file now (a uniquely named empty one, removed again).
fn probe(dir: &Path) -> std::io::Result<()> {
    let mut f = tempfile::Builder::new().prefix(".write-test").suffix(".tmp").tempfile_in(dir)?;
    f.write_all(b"probe")?;
    Ok(())
}

/// For `check-config --strict`: the folder exists or can be created, and takes a file.
///
/// Errors: [`Error::Spool`] naming what failed.
pub fn check_writable(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::spool(dir, format!("cannot create it: {e}")))?;
    probe(dir).map_err(|e| Error::spool(dir, format!("not writable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, max: usize, memory: usize) -> SpoolSection {
        SpoolSection { dir: dir.to_path_buf(), max_messages: max, memory_max_messages: memory, fsync: FsyncPolicy::Always, replay: true }
    }

    #[test]
    fn append_remove_replay_and_drop_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(&cfg(dir.path(), 3, 10)).unwrap();
        let ids: Vec<u64> = (0..4).map(|i| s.append(format!("m{i}").into_bytes())).collect();
        assert_eq!(s.len(), 3);
        assert_eq!(s.counts().dropped, 1);
        assert!(!s.contains(ids[0]), "the oldest is dropped when full");
        s.remove(ids[2]);
        // A crash mid-write leaves a .tmp file: ignored and cleaned on open.
        fs::write(dir.path().join("00000000000000000099.tmp"), b"half").unwrap();
        let s2 = Spool::open(&SpoolSection { fsync: FsyncPolicy::Never, ..cfg(dir.path(), 3, 10) }).unwrap();
        assert_eq!(s2.next_after(0), Some(ids[1]));
        assert_eq!(s2.next_after(ids[1]), Some(ids[3]));
        assert_eq!(s2.read(ids[3]).unwrap(), b"m3");
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        let mut s2 = s2;
        assert_eq!(s2.append(b"x".to_vec()), ids[3] + 1, "ids keep growing across restarts");
        // replay = false: what an earlier run left is deleted.
        drop(s2);
        let s3 = Spool::open(&SpoolSection { replay: false, ..cfg(dir.path(), 3, 10) }).unwrap();
        assert!(s3.is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// The spool's path turned into a file: every write fails (ENOTDIR), even for root.
    fn break_disk(dir: &Path) -> PathBuf {
        let aside = dir.with_extension("aside");
        fs::rename(dir, &aside).unwrap();
        fs::write(dir, b"not a folder").unwrap();
        aside
    }

    fn mend_disk(dir: &Path, aside: &Path) {
        fs::remove_file(dir).unwrap();
        fs::rename(aside, dir).unwrap();
    }

    #[test]
    fn a_disk_that_refuses_writes_keeps_captions_in_memory_then_catches_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let mut s = Spool::open(&cfg(&dir, 100, 3)).unwrap();
        let a = s.append(b"a".to_vec());
        s.remove(a);
        let aside = break_disk(&dir);
        let ids: Vec<u64> = (0..5).map(|i| s.append(format!("m{i}").into_bytes())).collect();
        let c = s.counts();
        assert_eq!((c.depth, c.memory, c.write_errors, c.dropped), (3, 3, 5, 2), "{c:?}");
        assert!(!s.contains(ids[0]) && !s.contains(ids[1]), "memory queue bounded: oldest dropped");
        assert_eq!(s.read(ids[4]).unwrap(), b"m4", "held captions can be published");
        s.remove(ids[2]);
        mend_disk(&dir, &aside);
        s.last_retry = None;
        s.retry_disk();
        let c = s.counts();
        assert_eq!((c.depth, c.memory), (2, 0), "{c:?}");
        let on_disk: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        assert_eq!(on_disk.len(), 2, "{on_disk:?}");
        // And a restart finds them, in order.
        drop(s);
        let s = Spool::open(&cfg(&dir, 100, 3)).unwrap();
        assert_eq!(s.next_after(0), Some(ids[3]));
        assert_eq!(s.read(ids[4]).unwrap(), b"m4");
    }

    #[test]
    fn dead_letters_are_kept_aside_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(&cfg(dir.path(), 10, 10)).unwrap();
        let a = s.append(b"big".to_vec());
        let b = s.append(b"ok".to_vec());
        let path = s.dead_letter(a).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"big");
        assert_eq!(s.counts().dead_lettered, 1);
        assert_eq!(s.next_after(0), Some(b));
        let s = Spool::open(&cfg(dir.path(), 10, 10)).unwrap();
        assert_eq!(s.len(), 1, "dead letters are not replayed");
        assert!(check_writable(dir.path()).is_ok());
        assert!(check_writable(&path.join("x")).is_err());
    }
}
