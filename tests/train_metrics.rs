//! Caption metrics against pycocoevalcap 1.2 on the same tokens (scripts/metrics_reference.py).
#![cfg(feature = "host")]

use vitgpt2::train::metrics::{score, tokenize};

const HYPS: [&str; 4] = [
    "un grand cercle rouge à gauche d'une petite étoile verte",
    "deux petits carrés bleus",
    "trois grandes croix violettes au-dessus d'un triangle",
    "une étoile",
];

fn refs() -> Vec<Vec<String>> {
    [
        vec!["un grand cercle rouge à gauche d'une petite étoile verte", "une petite étoile verte à droite d'un grand cercle rouge"],
        vec!["deux petits carrés noirs"],
        vec!["trois grandes croix violettes au-dessus d'un petit triangle jaune", "un petit triangle jaune au-dessous de trois grandes croix violettes"],
        vec!["une grande étoile orange"],
    ]
    .iter()
    .map(|r| r.iter().map(|s| s.to_string()).collect())
    .collect()
}

#[test]
fn matches_pycocoevalcap() {
    let hyps: Vec<String> = HYPS.iter().map(|s| s.to_string()).collect();
    let s = score(&hyps, &refs());
    // pycocoevalcap 1.2: Bleu(4), Rouge(), Cider() (CIDEr-D) on the same tokens.
    let bleu = [0.8244268452831607, 0.7813295589978579, 0.7748788676911021, 0.7668046753579058];
    for (k, (got, want)) in s.bleu.iter().zip(bleu).enumerate() {
        assert!((got - want).abs() < 1e-9, "BLEU-{} {got} vs {want}", k + 1);
    }
    assert!((s.rouge_l - 0.815730987598984).abs() < 1e-9, "ROUGE-L {}", s.rouge_l);
    assert!((s.cider_d - 4.75482849618938).abs() < 1e-9, "CIDEr-D {}", s.cider_d);
    assert!((s.exact - 0.25).abs() < 1e-12);
    assert_eq!(s.n, 4);
}

#[test]
fn tokenizer_is_language_neutral() {
    assert_eq!(tokenize("Trois GRANDES croix, au-dessus d'Ève !"), vec!["trois", "grandes", "croix", "au", "dessus", "d", "ève"]);
}
