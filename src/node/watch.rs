//! The watched folder: each new image captioned once, in name order, and only once complete.
//!
//! A file is taken once its size and modification time have not changed for the settle time
//! (`source.settle_ms`, at least one poll), so a writer that pauses (a network copy, an FTP
//! upload, a camera flushing in bursts) is waited for. A file that still fails to decode is
//! reported once and watched: if it changes (the writer paused longer than the settle time),
//! it is taken again; if it stays as it is, it is not read again. Polling rather than inotify:
//! it sees files written by other machines on network mounts, and needs no extra crate.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::camera::{is_image, read_frame, FrameSource, SourceEvent};
use crate::error::Error;

/// What a file looked like when listed: size in bytes and modification time.
type Signature = (u64, Option<SystemTime>);

/// A watched folder as a [`FrameSource`]; see the module documentation.
pub struct DirectorySource {
    dir: PathBuf,
    poll: Duration,
    settle: Duration,
    /// Captioned, or there at start with `existing = false`: never taken again.
    done: HashSet<PathBuf>,
    /// Candidates, with their signature and since when it has not changed.
    settling: BTreeMap<PathBuf, (Signature, Instant)>,
    /// Files that failed to decode, with the signature they had: taken again if it changes.
    failed: HashMap<PathBuf, Signature>,
    /// Files whose decoding failure was reported (one warning per file).
    reported: HashSet<PathBuf>,
    ready: VecDeque<(PathBuf, Signature)>,
    last_list: Option<Instant>,
    missing_logged: bool,
}

impl DirectorySource {
    /// Watches `dir` every `poll`; `existing`: also caption what is there already. The settle
    /// time is one poll until [`Self::settle`] sets it.
    pub fn new(dir: PathBuf, existing: bool, poll: Duration) -> Self {
        let mut done = HashSet::new();
        if !existing {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                done.extend(rd.flatten().map(|e| e.path()));
            }
        }
        DirectorySource {
            dir,
            poll,
            settle: Duration::ZERO,
            done,
            settling: BTreeMap::new(),
            failed: HashMap::new(),
            reported: HashSet::new(),
            ready: VecDeque::new(),
            last_list: None,
            missing_logged: false,
        }
    }

    /// A file is taken once unchanged for `settle` (and over at least one poll).
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    fn list(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "list", e))?;
        let mut present: Vec<(PathBuf, Signature)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_image(p) && !self.done.contains(p))
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                m.is_file().then(|| (p, (m.len(), m.modified().ok())))
            })
            .collect();
        present.sort_by(|a, b| a.0.cmp(&b.0));
        let names: HashSet<&PathBuf> = present.iter().map(|(p, _)| p).collect();
        // Files deleted meanwhile are forgotten (a new file of the same name is new).
        self.settling.retain(|p, _| names.contains(p));
        self.failed.retain(|p, _| names.contains(p));
        self.reported.retain(|p| names.contains(p));
        for (path, sig) in present {
            if self.ready.iter().any(|(p, _)| p == &path) {
                continue;
            }
            if let Some(old) = self.failed.get(&path) {
                if *old == sig {
                    continue; // still the file that failed: not read again
                }
                self.failed.remove(&path);
                tracing::info!(file = %path.display(), "file changed after it failed to decode: taken again once it settles");
            }
            match self.settling.get(&path) {
                Some((old, since)) if *old == sig => {
                    if now.duration_since(*since) >= self.settle {
                        self.settling.remove(&path);
                        self.ready.push_back((path, sig));
                    }
                }
                _ => {
                    self.settling.insert(path, (sig, now));
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, path: PathBuf, sig: Signature) -> SourceEvent {
        // Marked as failed until it decodes: a decoder that panics on it (the capture thread
        // catches that) leaves it marked, so it is not read again unless it changes.
        let first = self.reported.insert(path.clone());
        self.failed.insert(path.clone(), sig);
        match read_frame(&path) {
            ev @ SourceEvent::Frame { .. } => {
                self.failed.remove(&path);
                self.done.insert(path);
                ev
            }
            // Reported (and counted) once per file: failures after a change are quiet.
            SourceEvent::Bad { origin, error } if !first => {
                tracing::debug!(frame = %origin, error = %error, "frame still cannot be decoded");
                SourceEvent::Idle
            }
            other => other,
        }
    }
}

impl FrameSource for DirectorySource {
    fn next(&mut self, wait: Duration) -> SourceEvent {
        if let Some((p, sig)) = self.ready.pop_front() {
            return self.take(p, sig);
        }
        if self.last_list.is_some_and(|t| t.elapsed() < self.poll) {
            std::thread::sleep(wait.min(self.poll));
            return SourceEvent::Idle;
        }
        self.last_list = Some(Instant::now());
        match self.list() {
            Ok(()) => {
                self.missing_logged = false;
                match self.ready.pop_front() {
                    Some((p, sig)) => self.take(p, sig),
                    None => SourceEvent::Idle,
                }
            }
            // A folder that is not there yet (e.g. a mount) is waited for, not fatal.
            Err(e) if !self.missing_logged => {
                self.missing_logged = true;
                SourceEvent::Unavailable(e)
            }
            Err(_) => SourceEvent::Idle,
        }
    }
    fn live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        format!("directory {} (polled every {} ms, settle {} ms)", self.dir.display(), self.poll.as_millis(), self.settle.as_millis())
    }
}
