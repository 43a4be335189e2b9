//! What loading a checkpoint did with each tensor, as `init` and `convert` print it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// What a load did with each tensor name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// The weight files read.
    pub files: Vec<PathBuf>,
    /// Taken from the files.
    pub loaded: Vec<String>,
    /// Not in the files: freshly initialised (GPT-2's scheme).
    pub initialised: Vec<String>,
    /// In the files but not parameters: attention-mask buffers of old checkpoints, a tied LM head.
    pub ignored: Vec<String>,
    /// Left out on purpose, one line each with the reason (a Flax checkpoint's unused parts).
    pub dropped: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        writeln!(f, "loaded {} tensors from {}:", self.loaded.len(), files.join(", "))?;
        for g in group_names(&self.loaded) {
            writeln!(f, "  {g}")?;
        }
        writeln!(f, "initialised {} tensors:", self.initialised.len())?;
        for g in group_names(&self.initialised) {
            writeln!(f, "  {g}")?;
        }
        if !self.ignored.is_empty() {
            writeln!(f, "ignored {} tensors (buffers, tied LM head):", self.ignored.len())?;
            for g in group_names(&self.ignored) {
                writeln!(f, "  {g}")?;
            }
        }
        if !self.dropped.is_empty() {
            writeln!(f, "dropped on purpose:")?;
            for d in &self.dropped {
                writeln!(f, "  {d}")?;
            }
        }
        Ok(())
    }
}

/// Names with their layer numbers folded: `decoder.transformer.h.{0..11}.ln_1.weight`.
pub fn group_names(names: &[String]) -> Vec<String> {
    group_names_by(names, '.')
}

/// [`group_names`] for names whose parts are separated by `sep` (`/` in Flax trees).
pub fn group_names_by(names: &[String], sep: char) -> Vec<String> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for n in names {
        let mut index = None;
        let parts: Vec<&str> = n
            .split(sep)
            .map(|p| match p.parse::<usize>() {
                Ok(i) if index.is_none() => {
                    index = Some(i);
                    "{}"
                }
                _ => p,
            })
            .collect();
        let key = parts.join(&sep.to_string());
        let e = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            Vec::new()
        });
        if let Some(i) = index {
            e.push(i);
        }
    }
    order
        .into_iter()
        .map(|key| {
            let mut idx = groups[&key].clone();
            if idx.is_empty() {
                return key;
            }
            idx.sort_unstable();
            idx.dedup();
            let (lo, hi) = (idx[0], idx[idx.len() - 1]);
            let set = if idx.len() == 1 {
                lo.to_string()
            } else if hi - lo + 1 == idx.len() {
                format!("{{{lo}..{hi}}}")
            } else {
                format!("{{{}}}", idx.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","))
            };
            key.replacen("{}", &set, 1)
        })
        .collect()
}
