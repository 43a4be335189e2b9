"""Reference values for tests/train_metrics.rs from pycocoevalcap 1.2 (BLEU, ROUGE-L, CIDEr-D),
fed with captions already tokenized as vitgpt2's metrics tokenizer does (lowercase, split on
non-alphanumerics, accents kept): pycocoevalcap's PTBTokenizer (Java) and METEOR are
English-only and are not used.

    .venv-ref/bin/pip install --no-deps pycocoevalcap
    .venv-ref/bin/python scripts/metrics_reference.py
"""
import json
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

HYPS = [
    "un grand cercle rouge à gauche d'une petite étoile verte",
    "deux petits carrés bleus",
    "trois grandes croix violettes au-dessus d'un triangle",
    "une étoile",
]
REFS = [
    ["un grand cercle rouge à gauche d'une petite étoile verte", "une petite étoile verte à droite d'un grand cercle rouge"],
    ["deux petits carrés noirs"],
    ["trois grandes croix violettes au-dessus d'un petit triangle jaune", "un petit triangle jaune au-dessous de trois grandes croix violettes"],
    ["une grande étoile orange"],
]


def tok(s):
    return " ".join(w for w in re.split(r"[^\w]|_", s.lower()) if w)


res = {i: [tok(h)] for i, h in enumerate(HYPS)}
gts = {i: [tok(r) for r in rs] for i, rs in enumerate(REFS)}
bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
rouge, _ = Rouge().compute_score(gts, res)
cider, _ = Cider().compute_score(gts, res)
print(json.dumps({"bleu": bleu, "rouge_l": rouge, "cider_d": cider}))
