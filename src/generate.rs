//! Caption generation: greedy search and beam search, step for step as transformers'
//! `GenerationMixin` (v4.57) does it, over any decoder that implements [`DecoderSession`].
//!
//! The decoder runs with one row per hypothesis; generation only asks it for the next-token
//! logits of every row and tells it which rows survive (beam reordering). Graph layouts (Optimum's
//! export, the project's fast export, the candle model) plug in through that trait.

use ndarray::{Array2, ArrayView1};
use serde::{Deserialize, Serialize};

use crate::assets::SpecialTokens;
use crate::error::{Error, Result};

/// A running decoder over `rows` hypotheses that all attend to one image.
pub trait DecoderSession {
    /// Feeds one token per row (the token just appended to each hypothesis) and returns the
    /// next-token logits, `[rows, vocab]`.
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>>;
    /// Keeps the rows `rows` (in that order, repeats allowed) for the next step.
    fn reorder(&mut self, rows: &[usize]) -> Result<()>;
}

impl<T: DecoderSession + ?Sized> DecoderSession for Box<T> {
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
        (**self).step(tokens)
    }
    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        (**self).reorder(rows)
    }
}

/// transformers' `early_stopping`: `true`, `false` (heuristic) or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EarlyStopping {
    Bool(bool),
    Never(NeverTag),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeverTag {
    Never,
}

impl EarlyStopping {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "true" => Some(EarlyStopping::Bool(true)),
            "false" => Some(EarlyStopping::Bool(false)),
            "never" => Some(EarlyStopping::Never(NeverTag::Never)),
            _ => None,
        }
    }
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// The generation settings of `generation_config.json` that this decoder honours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Total decoder length, decoder start token included (transformers' meaning).
    pub max_length: usize,
    pub min_length: usize,
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub no_repeat_ngram_size: usize,
    pub decoder_start_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

/// The fields of a `generation_config.json` this crate reads, as written (all optional).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawGenerationConfig {
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_length: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<EarlyStopping>,
    pub no_repeat_ngram_size: Option<usize>,
    pub decoder_start_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<OneOrMany>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// The settings of a `generation_config.json` (`raw`; all `None` when the file is absent)
    /// with the model's special tokens (resolved once, see [`crate::assets::SpecialTokens`]) and
    /// transformers' defaults for the rest: max_length 20, greedy, length_penalty 1,
    /// early_stopping false. Errors: as [`Self::validate`].
    pub fn from_raw(raw: &RawGenerationConfig, special: &SpecialTokens) -> Result<Self> {
        if raw.do_sample == Some(true) {
            tracing::warn!("generation config asks for sampling; captions are decoded deterministically");
        }
        if raw.repetition_penalty.is_some_and(|p| p != 1.0) {
            tracing::warn!("repetition_penalty is not supported and is ignored");
        }
        let max_length = match (raw.max_new_tokens, raw.max_length) {
            (Some(n), _) => n + 1,
            (None, Some(m)) => m,
            (None, None) => 20,
        };
        let cfg = GenerationConfig {
            max_length,
            min_length: raw.min_length.unwrap_or(0),
            num_beams: raw.num_beams.unwrap_or(1),
            length_penalty: raw.length_penalty.unwrap_or(1.0),
            early_stopping: raw.early_stopping.unwrap_or(EarlyStopping::Bool(false)),
            no_repeat_ngram_size: raw.no_repeat_ngram_size.unwrap_or(0),
            decoder_start_token_id: special.decoder_start,
            eos_token_ids: special.eos.clone(),
            pad_token_id: special.pad,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Plain greedy search up to `max_length` (decoder start included): what training's
    /// evaluation runs.
    pub fn greedy(special: &SpecialTokens, max_length: usize) -> Self {
        GenerationConfig {
            max_length,
            min_length: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Bool(false),
            no_repeat_ngram_size: 0,
            decoder_start_token_id: special.decoder_start,
            eos_token_ids: special.eos.clone(),
            pad_token_id: special.pad,
        }
    }

    /// Settings decoding can run with. Errors: [`Error::Invalid`] naming the field (no beams, a
    /// max_length below 2, no eos id, a non-finite length_penalty); callers add the file or
    /// setting.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: &str| Err(Error::Invalid(msg.into()));
        if self.num_beams == 0 {
            return invalid("num_beams must be at least 1");
        }
        if self.max_length < 2 {
            return invalid("max_length must be at least 2 (the decoder start token plus one)");
        }
        if self.eos_token_ids.is_empty() {
            return invalid("eos_token_id is empty");
        }
        if !self.length_penalty.is_finite() {
            return invalid("length_penalty must be a finite number");
        }
        Ok(())
    }
}

/// Generation settings given on a command line or in a config file; unset ones keep the
/// bundle's `generation_config.json`. The one options struct for generation: every command
/// and the daemon take it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationOverrides {
    pub num_beams: Option<usize>,
    pub max_length: Option<usize>,
    pub min_length: Option<usize>,
    pub no_repeat_ngram_size: Option<usize>,
    pub length_penalty: Option<f32>,
    /// `true`, `false` or `never`.
    pub early_stopping: Option<String>,
}

impl GenerationOverrides {
    /// `base` with every set field replaced. Errors: an unknown `early_stopping` word, or a
    /// result that fails [`GenerationConfig::validate`].
    pub fn apply(&self, base: &GenerationConfig) -> Result<GenerationConfig> {
        let mut g = base.clone();
        if let Some(v) = self.num_beams {
            g.num_beams = v;
        }
        if let Some(v) = self.max_length {
            g.max_length = v;
        }
        if let Some(v) = self.min_length {
            g.min_length = v;
        }
        if let Some(v) = self.no_repeat_ngram_size {
            g.no_repeat_ngram_size = v;
        }
        if let Some(v) = self.length_penalty {
            g.length_penalty = v;
        }
        if let Some(v) = &self.early_stopping {
            g.early_stopping = EarlyStopping::parse(v)
                .ok_or_else(|| Error::setting("early_stopping", format!("`{v}`: use true, false or never")))?;
        }
        g.validate().map_err(|e| Error::setting("generation", e))?;
        Ok(g)
    }

    /// Field by field: this one's value where set, else `fallback`'s (command-line flags over a
    /// config file's `[model.generation]`).
    pub fn or(&self, fallback: &GenerationOverrides) -> GenerationOverrides {
        GenerationOverrides {
            num_beams: self.num_beams.or(fallback.num_beams),
            max_length: self.max_length.or(fallback.max_length),
            min_length: self.min_length.or(fallback.min_length),
            no_repeat_ngram_size: self.no_repeat_ngram_size.or(fallback.no_repeat_ngram_size),
            length_penalty: self.length_penalty.or(fallback.length_penalty),
            early_stopping: self.early_stopping.clone().or_else(|| fallback.early_stopping.clone()),
        }
    }
}

/// One generated caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generated {
    /// Generated ids without the decoder start token, up to and including `</s>` when produced.
    pub tokens: Vec<u32>,
    /// Sum of the token log-probabilities divided by `len ^ length_penalty` (transformers'
    /// `sequences_scores` for beam search; the same formula for greedy).
    pub score: f32,
    /// Decoder steps run.
    pub steps: usize,
}

/// Runs greedy or beam search. `start(rows)` opens a decoder session over `rows` rows.
pub fn generate<S, F>(cfg: &GenerationConfig, start: F) -> Result<Generated>
where
    S: DecoderSession,
    F: FnOnce(usize) -> Result<S>,
{
    cfg.validate().map_err(|e| Error::setting("generation", e))?;
    if cfg.num_beams == 1 {
        greedy(cfg, start(1)?)
    } else {
        beam_search(cfg, start(cfg.num_beams)?)
    }
}

fn log_softmax(row: ArrayView1<f32>) -> Vec<f32> {
    let (max, log_sum) = max_and_log_sum_exp(row);
    // torch's order of operations: (x - max) - log(sum).
    row.iter().map(|&x| (x - max) - log_sum).collect()
}

/// `max(row)` and `ln Σ exp(x - max)`, the two constants of a row's log-softmax.
fn max_and_log_sum_exp(row: ArrayView1<f32>) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    (max, sum.ln())
}

/// transformers' `MinLengthLogitsProcessor` and `NoRepeatNGramLogitsProcessor`, on one row.
/// `seq` is the hypothesis so far, decoder start token included.
fn apply_processors(cfg: &GenerationConfig, seq: &[u32], scores: &mut [f32]) {
    if seq.len() < cfg.min_length {
        for &e in &cfg.eos_token_ids {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    let n = cfg.no_repeat_ngram_size;
    if n > 0 && seq.len() + 1 >= n {
        let prefix = &seq[seq.len() + 1 - n..];
        for w in seq.windows(n) {
            if &w[..n - 1] == prefix {
                if let Some(s) = scores.get_mut(w[n - 1] as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
}

fn strip(cfg: &GenerationConfig, seq: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    for &t in &seq[1..] {
        out.push(t);
        if cfg.eos_token_ids.contains(&t) {
            break;
        }
    }
    out
}

fn length_norm(len: usize, length_penalty: f32) -> f32 {
    // transformers divides by a Python float: (int ** float) computed in double precision.
    (len as f64).powf(length_penalty as f64) as f32
}

/// transformers' `_sample` with `do_sample=False`: processors on the raw logits, argmax.
fn greedy<S: DecoderSession>(cfg: &GenerationConfig, mut sess: S) -> Result<Generated> {
    let mut seq = vec![cfg.decoder_start_token_id];
    let mut logprob_sum = 0.0f32;
    let mut steps = 0;
    loop {
        let last = seq[seq.len() - 1];
        let logits = sess.step(&[last])?;
        steps += 1;
        let mut scores = logits.row(0).to_vec();
        apply_processors(cfg, &seq, &mut scores);
        // First maximum, as torch.argmax.
        let mut best = 0usize;
        for (i, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = i;
            }
        }
        // The chosen token's log-probability, as `log_softmax(scores)[best]` computes it.
        let (max, log_sum) = max_and_log_sum_exp(ArrayView1::from(&scores[..]));
        logprob_sum += (scores[best] - max) - log_sum;
        seq.push(best as u32);
        if cfg.eos_token_ids.contains(&(best as u32)) || seq.len() >= cfg.max_length {
            break;
        }
    }
    let tokens = strip(cfg, &seq);
    let score = logprob_sum / length_norm(tokens.len(), cfg.length_penalty);
    Ok(Generated { tokens, score, steps })
}

struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
}

/// Appends to `out` the `keep` best continuations of beam `beam` (scores `log_probs + running`)
/// in torch.topk's order: higher score first, among equal scores the lower token. One pass; a
/// continuation is compared with the `keep`-th best so far, and only a better one is placed.
fn top_of_row(log_probs: &[f32], running: f32, beam: usize, keep: usize, out: &mut Vec<Candidate>) {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(keep + 1);
    for (t, &v) in log_probs.iter().enumerate() {
        let score = v + running;
        // Tokens come in increasing order, so an equal score ranks below those already kept.
        if best.len() == keep && best.last().is_none_or(|w| score.total_cmp(&w.0).is_le()) {
            continue;
        }
        let at = best.partition_point(|w| w.0.total_cmp(&score).is_ge());
        best.insert(at, (score, t as u32));
        best.truncate(keep);
    }
    out.extend(best.into_iter().map(|(score, token)| Candidate { score, beam, token }));
}

/// transformers' vectorised `_beam_search` (v4.57) for one image: top-2k continuations over all
/// beams, the best k unfinished continue, finished ones compete for the k output slots.
fn beam_search<S: DecoderSession>(cfg: &GenerationConfig, mut sess: S) -> Result<Generated> {
    const NEG: f32 = -1.0e9;
    let k = cfg.num_beams;
    let n_eos = cfg.eos_token_ids.len();
    let keep = (1 + n_eos).max(2) * k;
    let prompt_len = 1usize;
    let never = matches!(cfg.early_stopping, EarlyStopping::Never(_));
    let early_true = cfg.early_stopping == EarlyStopping::Bool(true);

    let mut running: Vec<Vec<u32>> = vec![vec![cfg.decoder_start_token_id]; k];
    let mut running_scores = vec![NEG; k];
    running_scores[0] = 0.0;
    // Finished slots: sequence, score, whether it is really finished.
    let mut finished: Vec<(Vec<u32>, f32, bool)> = vec![(vec![cfg.decoder_start_token_id], NEG, false); k];
    let mut improvement_possible = true;
    let mut cur_len = prompt_len;
    let mut steps = 0;

    loop {
        let last: Vec<u32> = running.iter().map(|s| s[s.len() - 1]).collect();
        let logits = sess.step(&last)?;
        steps += 1;
        // torch.topk over all beams' continuations: descending; among equal scores the lower
        // flat index first. That order is total, so the best `keep` overall are the best `keep`
        // of the beams' own best `keep`: no list of k × vocab candidates to select from (a
        // beam-4 step's own work 1.84–2.01 → 1.45–1.67 ms, README "Performance").
        let mut cands: Vec<Candidate> = Vec::with_capacity(k * keep);
        for (b, seq) in running.iter().enumerate() {
            let mut lp = log_softmax(logits.row(b));
            apply_processors(cfg, seq, &mut lp);
            top_of_row(&lp, running_scores[b], b, keep, &mut cands);
        }
        cands.sort_by(|a, b| b.score.total_cmp(&a.score).then((a.beam, a.token).cmp(&(b.beam, b.token))));
        cands.truncate(keep);
        let top_seqs: Vec<Vec<u32>> = cands
            .iter()
            .map(|c| {
                let mut s = running[c.beam].clone();
                s.push(c.token);
                s
            })
            .collect();
        let hits: Vec<bool> = cands
            .iter()
            .map(|c| cfg.eos_token_ids.contains(&c.token) || cur_len + 1 >= cfg.max_length)
            .collect();

        // Beams that continue: the best k continuations that did not stop.
        let mut order: Vec<usize> = (0..cands.len()).collect();
        let run_score = |i: usize| cands[i].score + if hits[i] { NEG } else { 0.0 };
        order.sort_by(|&a, &b| run_score(b).total_cmp(&run_score(a)).then(a.cmp(&b)));
        let next: Vec<usize> = order[..k].to_vec();

        // Finished hypotheses: merge the new ones with the old, keep the best k.
        let all_finished = finished.iter().all(|f| f.2);
        let mut merged: Vec<(Vec<u32>, f32, bool)> = finished.clone();
        for (i, c) in cands.iter().enumerate() {
            let just_finished = hits[i] && i < k;
            let mut s = c.score / length_norm(cur_len + 1 - prompt_len, cfg.length_penalty);
            if all_finished && early_true {
                s += NEG;
            }
            if !improvement_possible {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            merged.push((top_seqs[i].clone(), s, just_finished));
        }
        let mut midx: Vec<usize> = (0..merged.len()).collect();
        midx.sort_by(|&a, &b| merged[b].1.total_cmp(&merged[a].1).then(a.cmp(&b)));
        finished = midx[..k].iter().map(|&i| merged[i].clone()).collect();

        running = next.iter().map(|&i| top_seqs[i].clone()).collect();
        running_scores = next.iter().map(|&i| run_score(i)).collect();
        let rows: Vec<usize> = next.iter().map(|&i| cands[i].beam).collect();
        cur_len += 1;

        // Can a running beam still beat the worst finished one?
        let best_len = if never && cfg.length_penalty > 0.0 { cfg.max_length - prompt_len } else { cur_len - prompt_len };
        let best_running = running_scores[0] / length_norm(best_len, cfg.length_penalty);
        let min_finished = finished.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
        let can_improve = finished.iter().any(|f| best_running > if f.2 { min_finished } else { NEG });
        improvement_possible = improvement_possible && can_improve;

        let open_beam = !(finished.iter().all(|f| f.2) && early_true);
        let valid_continuations = !hits.iter().all(|&h| h);
        if !(improvement_possible && open_beam && valid_continuations) {
            break;
        }
        sess.reorder(&rows)?;
    }
    let (best, score, _) = &finished[0];
    Ok(Generated { tokens: strip(cfg, best), score: *score, steps })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose logits depend only on the last token: a fixed transition table.
    struct Table {
        table: Vec<Vec<f32>>,
        rows: usize,
    }

    impl DecoderSession for &mut Table {
        fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
            assert_eq!(tokens.len(), self.rows);
            let v = self.table[0].len();
            let mut out = Array2::zeros((tokens.len(), v));
            for (r, &t) in tokens.iter().enumerate() {
                for (j, x) in self.table[t as usize].iter().enumerate() {
                    out[[r, j]] = *x;
                }
            }
            Ok(out)
        }
        fn reorder(&mut self, rows: &[usize]) -> Result<()> {
            assert_eq!(rows.len(), self.rows);
            Ok(())
        }
    }

    fn cfg(num_beams: usize) -> GenerationConfig {
        GenerationConfig {
            max_length: 6,
            min_length: 0,
            num_beams,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Bool(false),
            no_repeat_ngram_size: 0,
            decoder_start_token_id: 0,
            eos_token_ids: vec![2],
            pad_token_id: 1,
        }
    }

    #[test]
    fn greedy_follows_argmax_and_stops_at_eos() {
        // 0 -> 3 -> 4 -> 2 (eos)
        let mut t = Table {
            table: vec![
                vec![0., 0., 0., 5., 1.],
                vec![0.; 5],
                vec![0.; 5],
                vec![0., 0., 1., 0., 5.],
                vec![0., 0., 5., 1., 0.],
            ],
            rows: 1,
        };
        let g = generate(&cfg(1), |_| Ok(&mut t)).unwrap();
        assert_eq!(g.tokens, vec![3, 4, 2]);
        assert_eq!(g.steps, 3);
    }

    #[test]
    fn min_length_and_ngram_block() {
        let mut c = cfg(1);
        c.min_length = 4;
        c.no_repeat_ngram_size = 2;
        // From 3, eos is best but banned until length 4; 3 -> 3 repeats are then banned.
        let mut t = Table {
            table: vec![vec![0., 0., 0., 5., 1.], vec![0.; 5], vec![0.; 5], vec![0., 0., 9., 4., 3.], vec![0., 0., 9., 5., 0.]],
            rows: 1,
        };
        let g = generate(&c, |_| Ok(&mut t)).unwrap();
        // seq: 0 3 (eos banned, len 2) 3 (eos banned, len 3; 3-3 not yet seen) then 4? (3,3) seen,
        // so after [0,3,3] the bigram (3,3) is banned -> 4; len 4 allows eos.
        assert_eq!(g.tokens, vec![3, 3, 4, 2]);
    }

    #[test]
    fn best_of_rows_is_torch_topk_over_all_rows() {
        // Scores on a coarse grid (many ties, within and across rows, some -inf), and NaN.
        let mut x = 7u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 16) % 9
        };
        for case in 0..50 {
            let (rows, vocab, keep) = (1 + case % 4, 1 + case % 23, 2 + case % 7);
            let table: Vec<Vec<f32>> = (0..rows)
                .map(|_| (0..vocab).map(|_| match next() { 0 => f32::NEG_INFINITY, 1 if case % 5 == 0 => f32::NAN, v => v as f32 * 0.5 }).collect())
                .collect();
            let running: Vec<f32> = (0..rows).map(|r| -(r as f32) * 0.5).collect();
            let mut got = Vec::new();
            for (b, row) in table.iter().enumerate() {
                top_of_row(row, running[b], b, keep, &mut got);
            }
            got.sort_by(|a, b| b.score.total_cmp(&a.score).then((a.beam, a.token).cmp(&(b.beam, b.token))));
            got.truncate(keep);
            // The definition: every continuation, sorted by score then flat index.
            let mut all: Vec<(f32, usize)> = (0..rows * vocab).map(|f| (table[f / vocab][f % vocab] + running[f / vocab], f)).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<(u32, usize)> = all.iter().take(keep).map(|&(s, f)| (s.to_bits(), f)).collect();
            let got: Vec<(u32, usize)> = got.iter().map(|c| (c.score.to_bits(), c.beam * vocab + c.token as usize)).collect();
            assert_eq!(got, want, "case {case}: rows {rows}, vocab {vocab}, keep {keep}");
        }
    }

    #[test]
    fn beam_search_finds_better_total_than_greedy() {
        // Greedy takes 3 (logit 5) then is stuck with a poor continuation; beam finds 4 -> 2.
        let mut t = Table {
            table: vec![
                vec![-9., -9., -9., 2.0, 1.8],
                vec![0.; 5],
                vec![0.; 5],
                vec![-9., -9., 0., 0., 0.],
                vec![-9., -9., 9., -9., -9.],
            ],
            rows: 1,
        };
        let g = generate(&cfg(1), |_| Ok(&mut t)).unwrap();
        assert_eq!(g.tokens[0], 3);
        t.rows = 2;
        let b = generate(&cfg(2), |_| Ok(&mut t)).unwrap();
        assert_eq!(b.tokens, vec![4, 2]);
        assert!(b.score > g.score);
    }
}
