//! Caption metrics with a language-neutral tokenizer (lowercase, split on anything that is not
//! a Unicode letter or digit, so French accents are kept): corpus BLEU-1..4, ROUGE-L and
//! CIDEr-D computed as coco-caption (pycocoevalcap) computes them, and exact match.

use std::collections::HashMap;

/// Lowercased words: runs of Unicode alphanumerics (« d'un » → « d », « un »).
pub fn tokenize(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

fn ngrams(words: &[String], n: usize) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    if words.len() >= n {
        for w in words.windows(n) {
            *m.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    m
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Scores {
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider_d: f64,
    /// Fraction of hypotheses equal (after tokenization) to one of their references.
    pub exact: f64,
    pub n: usize,
}

/// Scores `hyps[i]` against `refs[i]` (one or more references each).
pub fn score(hyps: &[String], refs: &[Vec<String>]) -> Scores {
    let h: Vec<Vec<String>> = hyps.iter().map(|s| tokenize(s)).collect();
    let r: Vec<Vec<Vec<String>>> = refs.iter().map(|rs| rs.iter().map(|s| tokenize(s)).collect()).collect();
    let exact = if h.is_empty() { 0.0 } else { h.iter().zip(&r).filter(|(h, rs)| rs.iter().any(|x| x == *h)).count() as f64 / h.len() as f64 };
    Scores { bleu: bleu(&h, &r), rouge_l: rouge_l(&h, &r), cider_d: cider_d(&h, &r), exact, n: h.len() }
}

/// coco-caption's corpus BLEU: clipped n-gram counts summed over the corpus, the closest
/// reference length per sentence, brevity penalty on the totals.
pub fn bleu(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> [f64; 4] {
    let (tiny, small) = (1e-15, 1e-9);
    let mut guess = [0f64; 4];
    let mut correct = [0f64; 4];
    let (mut test_len, mut ref_len) = (0f64, 0f64);
    for (h, rs) in hyps.iter().zip(refs) {
        test_len += h.len() as f64;
        // Closest reference length (the shorter on ties).
        let best = rs.iter().map(|r| r.len()).min_by_key(|&l| ((l as i64 - h.len() as i64).abs(), l)).unwrap_or(0);
        ref_len += best as f64;
        for n in 1..=4 {
            let hc = ngrams(h, n);
            let mut max_ref: HashMap<Vec<String>, usize> = HashMap::new();
            for r in rs {
                for (g, c) in ngrams(r, n) {
                    let e = max_ref.entry(g).or_insert(0);
                    *e = (*e).max(c);
                }
            }
            guess[n - 1] += h.len().saturating_sub(n - 1) as f64;
            correct[n - 1] += hc.iter().map(|(g, &c)| c.min(*max_ref.get(g).unwrap_or(&0))).sum::<usize>() as f64;
        }
    }
    let mut out = [0f64; 4];
    let mut prod = 1.0;
    let ratio = (test_len + tiny) / (ref_len + small);
    for k in 0..4 {
        prod *= (correct[k] + tiny) / (guess[k] + small);
        let mut b = prod.powf(1.0 / (k as f64 + 1.0));
        if ratio < 1.0 {
            b *= (1.0 - 1.0 / ratio).exp();
        }
        out[k] = b;
    }
    out
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// coco-caption's ROUGE-L: per sentence, the best precision and the best recall over the
/// references, F-measure with beta = 1.2; the corpus score is the mean.
pub fn rouge_l(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    let beta: f64 = 1.2;
    if hyps.is_empty() {
        return 0.0;
    }
    let mut total = 0.0;
    for (h, rs) in hyps.iter().zip(refs) {
        let (mut p, mut r) = (0f64, 0f64);
        for rf in rs {
            let l = lcs(h, rf) as f64;
            if !h.is_empty() {
                p = p.max(l / h.len() as f64);
            }
            if !rf.is_empty() {
                r = r.max(l / rf.len() as f64);
            }
        }
        if p != 0.0 && r != 0.0 {
            total += ((1.0 + beta * beta) * p * r) / (r + beta * beta * p);
        }
    }
    total / hyps.len() as f64
}

type Vecs = (Vec<HashMap<Vec<String>, f64>>, Vec<f64>, f64);

/// coco-caption's CIDEr-D: tf-idf n-gram vectors (n = 1..4, document frequencies from the
/// references of this set), clipped cosine similarity, Gaussian length penalty (sigma 6),
/// averaged over n and references, ×10; the corpus score is the mean.
pub fn cider_d(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    let sigma: f64 = 6.0;
    if hyps.is_empty() {
        return 0.0;
    }
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for rs in refs {
        let mut seen = std::collections::HashSet::new();
        for r in rs {
            for n in 1..=4 {
                for g in ngrams(r, n).into_keys() {
                    seen.insert(g);
                }
            }
        }
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let log_n = (refs.len() as f64).ln();
    let to_vec = |words: &[String]| -> Vecs {
        let mut vec = vec![HashMap::new(); 4];
        let mut norm = vec![0f64; 4];
        let mut length = 0f64;
        for n in 1..=4 {
            for (g, tf) in ngrams(words, n) {
                let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
                let v = tf as f64 * (log_n - d);
                norm[n - 1] += v * v;
                // coco-caption counts the length in bigrams (its `n == 1` is the 2-gram index).
                if n == 2 {
                    length += tf as f64;
                }
                vec[n - 1].insert(g, v);
            }
        }
        (vec, norm.into_iter().map(f64::sqrt).collect(), length)
    };
    let mut total = 0.0;
    for (h, rs) in hyps.iter().zip(refs) {
        let (vh, nh, lh) = to_vec(h);
        let mut acc = [0f64; 4];
        for r in rs {
            let (vr, nr, lr) = to_vec(r);
            let delta = lh - lr;
            for n in 0..4 {
                let mut val = 0.0;
                for (g, &x) in &vh[n] {
                    if let Some(&y) = vr[n].get(g) {
                        val += x.min(y) * y;
                    }
                }
                if nh[n] != 0.0 && nr[n] != 0.0 {
                    val /= nh[n] * nr[n];
                }
                acc[n] += val * (-(delta * delta) / (2.0 * sigma * sigma)).exp();
            }
        }
        let mean = acc.iter().sum::<f64>() / 4.0;
        total += mean / rs.len().max(1) as f64 * 10.0;
    }
    total / hyps.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_accents() {
        assert_eq!(tokenize("Deux étoiles à droite d'un Carré."), vec!["deux", "étoiles", "à", "droite", "d", "un", "carré"]);
    }

    #[test]
    fn perfect_match() {
        let s = score(&["un grand cercle rouge".into()], &[vec!["un grand cercle rouge".into()]]);
        assert!((s.bleu[3] - 1.0).abs() < 1e-6 && (s.rouge_l - 1.0).abs() < 1e-9 && s.exact == 1.0);
    }
}
