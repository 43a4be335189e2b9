#!/usr/bin/env python3
"""Which attributes a model gets wrong on the synthetic French set.

Reads the predictions that `vitgpt2-host evaluate --predictions FILE` writes (one JSON object per
image: caption, references) and parses captions back into scenes (the grammar of
src/train/synth.rs: « deux petites étoiles vertes au-dessus d'un grand cercle rouge »). For each
image it takes the reference whose first group matches the hypothesis' order, then reports, over
the groups, how often count, size, shape and colour are right, and how often the relation is.

    python3 scripts/synth_errors.py PREDICTIONS.jsonl
"""
import json
import re
import sys

COUNTS = {"un": 1, "une": 1, "deux": 2, "trois": 3}
SIZES = {"petit": "petit", "petite": "petit", "petits": "petit", "petites": "petit",
         "grand": "grand", "grande": "grand", "grands": "grand", "grandes": "grand"}
SHAPES = {"cercle": "cercle", "cercles": "cercle", "carré": "carré", "carrés": "carré",
          "triangle": "triangle", "triangles": "triangle", "étoile": "étoile", "étoiles": "étoile",
          "croix": "croix"}
COLOURS = {"rouge": "rouge", "rouges": "rouge", "vert": "vert", "verte": "vert", "verts": "vert",
           "vertes": "vert", "bleu": "bleu", "bleue": "bleu", "bleus": "bleu", "bleues": "bleu",
           "jaune": "jaune", "jaunes": "jaune", "noir": "noir", "noire": "noir", "noirs": "noir",
           "noires": "noir", "orange": "orange", "violet": "violet", "violette": "violet",
           "violets": "violet", "violettes": "violet"}
RELATIONS = ["à gauche", "à droite", "au-dessus", "au-dessous"]


def group(text):
    words = text.replace("d'", "").split()
    if words and words[0] == "de":
        words = words[1:]
    if len(words) != 4:
        return None
    try:
        return (COUNTS[words[0]], SIZES[words[1]], SHAPES[words[2]], COLOURS[words[3]])
    except KeyError:
        return None


def parse(caption):
    for rel in RELATIONS:
        m = re.match(rf"^(.*) {rel} (.*)$", caption)
        if m:
            return group(m.group(1)), rel, group(m.group(2))
    return group(caption), None, None


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    fields = ["count", "size", "shape", "colour"]
    right = {f: 0 for f in fields}
    groups = exact = rel_right = rel_total = unparsed = 0
    for r in rows:
        hyp = parse(r["caption"])
        refs = [parse(c) for c in r["references"]]
        exact += r["caption"] in r["references"]
        # The reference that starts like the hypothesis (two-group scenes can be told from either side).
        ref = max(refs, key=lambda x: sum(a == b for a, b in zip(x[0] or (), hyp[0] or ())))
        if hyp[0] is None:
            unparsed += 1
            continue
        for h, t in ((hyp[0], ref[0]), (hyp[2], ref[2])):
            if t is None:
                continue
            groups += 1
            if h is None:
                continue
            for i, f in enumerate(fields):
                right[f] += h[i] == t[i]
        if ref[1] is not None:
            rel_total += 1
            rel_right += hyp[1] == ref[1]
    n = len(rows)
    out = {"images": n, "exact": exact / n, "unparsed": unparsed, "groups": groups}
    out.update({f: right[f] / max(groups, 1) for f in fields})
    out["relation"] = rel_right / max(rel_total, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
