#!/usr/bin/env python3
"""The exported graphs outside tract, with only onnx + onnxruntime + numpy (what CI installs).

Driven by tests/export_fast.rs (`onnxruntime_agrees_with_tract`), which exports a bundle, runs
its graphs in tract and writes what tract computed to a JSON file:

    {"pixel_values": [...], "pixel_shape": [1,3,H,W],
     "fp32": {"tokens": [[t_row0, t_row1, ...], ...], "logits": [[[...vocab...] per row] per step]},
     "int8": {...}}

This script then
1. runs onnx.checker (full check, with shape inference) on every .onnx file of the bundle;
2. feeds the same pixels and, step by step, the same tokens for the same rows (several
   hypotheses at once, as beam search does) to the fast layout in onnxruntime and compares its
   logits with tract's: fp32 within --tol, int8 within --int8-tol;
3. runs the Optimum layout's fp32 encoder_model + decoder_model on row 0's token prefix and
   compares every position's logits with tract's fast-layout logits (within --tol).

Exit status 0 when every check passes; the last line is a JSON summary.

    python scripts/check_ort.py BUNDLE TRACT_JSON [--tol 1e-4] [--int8-tol 1e-3]
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def fast_logits(bundle, suffix, pixels, tokens):
    """Runs encoder_fast + decoder_step along the given tokens; logits per step [B, vocab]."""
    enc = session(os.path.join(bundle, f"encoder_fast{suffix}.onnx"))
    dec = session(os.path.join(bundle, f"decoder_step{suffix}.onnx"))
    names = [o.name for o in enc.get_outputs()]
    outs = dict(zip(names, enc.run(None, {"pixel_values": pixels})))
    cross = {k: v for k, v in outs.items() if k.startswith("cross.")}
    layers = len(cross) // 2
    heads, hd = cross["cross.0.key"].shape[1], cross["cross.0.key"].shape[3]
    rows = len(tokens[0])
    past = {f"past.{i}.{kv}": np.zeros((rows, heads, 0, hd), np.float32) for i in range(layers) for kv in ("key", "value")}
    dec_out = [o.name for o in dec.get_outputs()]
    result = []
    for pos, step in enumerate(tokens):
        feed = {
            "input_ids": np.array(step, np.int64).reshape(rows, 1),
            "position_ids": np.full((rows, 1), pos, np.int64),
            **past,
            **cross,
        }
        o = dict(zip(dec_out, dec.run(None, feed)))
        result.append(o["logits"])
        past = {f"past.{i}.{kv}": o[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")}
    return np.stack(result)


def graph_path(bundle, name):
    """`name` under onnx/ (where the exporter writes Optimum's layout, as transformers.js wants) or at the root."""
    for p in (os.path.join(bundle, "onnx", name), os.path.join(bundle, name)):
        if os.path.exists(p):
            return p
    return None


def optimum_logits(bundle, pixels, prefix):
    enc = session(graph_path(bundle, "encoder_model.onnx"))
    dec = session(graph_path(bundle, "decoder_model.onnx"))
    hidden = enc.run(None, {"pixel_values": pixels})[0]
    names = [i.name for i in dec.get_inputs()]
    feed = {"input_ids": np.array([prefix], np.int64), "encoder_hidden_states": hidden}
    feed = {k: v for k, v in feed.items() if k in names}
    return dec.run(["logits"], feed)[0][0]


def merged_logits(bundle, pixels, prefix):
    """decoder_model_merged as transformers.js drives it: an empty past at the first step, then one
    token at a time with the past it returned. Returns [len(prefix), vocab]."""
    enc = session(graph_path(bundle, "encoder_model.onnx"))
    dec = session(graph_path(bundle, "decoder_model_merged.onnx"))
    hidden = enc.run(None, {"pixel_values": pixels})[0]
    past_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    out_names = [o.name for o in dec.get_outputs()]
    result = []
    for tok in prefix:
        o = dict(zip(out_names, dec.run(None, {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": hidden, **past})))
        result.append(o["logits"][0, -1])
        past = {n: o[n.replace("past_key_values.", "present.")] for n in past}
    return np.stack(result)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("tract_json")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--int8-tol", type=float, default=1e-3)
    a = ap.parse_args()
    with open(a.tract_json) as f:
        ref = json.load(f)
    pixels = np.array(ref["pixel_values"], np.float32).reshape(ref["pixel_shape"])
    ok = True
    summary = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}

    checked = []
    for folder in (a.bundle, os.path.join(a.bundle, "onnx")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".onnx"):
                onnx.checker.check_model(os.path.join(folder, name), full_check=True)
                checked.append(os.path.relpath(os.path.join(folder, name), a.bundle))
    print(f"onnx.checker (full): {len(checked)} graphs OK: {', '.join(checked)}")
    summary["checked"] = checked

    for form, suffix, tol in (("fp32", "", a.tol), ("int8", "_int8", a.int8_tol)):
        if form not in ref:
            continue
        tokens = ref[form]["tokens"]
        want = np.array(ref[form]["logits"], np.float32)
        got = fast_logits(a.bundle, suffix, pixels, tokens)
        diff = float(np.abs(got - want).max())
        same = int((got.argmax(-1) == want.argmax(-1)).sum())
        total = int(np.prod(want.shape[:2]))
        good = diff <= tol and same == total
        ok &= good
        print(f"fast layout {form}: {len(tokens)} steps × {len(tokens[0])} rows: max |onnxruntime - tract| logits {diff:.2e} (tol {tol:g}), argmax agrees {same}/{total}: {'OK' if good else 'FAIL'}")
        summary[f"fast_{form}_max_diff"] = diff
        summary[f"fast_{form}_argmax_agree"] = [same, total]

    # Optimum's decoders on row 0's token path, against tract's fast-layout logits.
    optimum_checks = (
        ("decoder_model.onnx", optimum_logits, "optimum", "optimum layout fp32: decoder_model on the whole prefix"),
        ("decoder_model_merged.onnx", merged_logits, "optimum_merged", "optimum merged fp32: decoder_model_merged step by step from an empty past"),
    )
    for graph, logits_of, key, what in optimum_checks:
        if "fp32" not in ref or not graph_path(a.bundle, graph):
            continue
        prefix = [step[0] for step in ref["fp32"]["tokens"]]
        want = np.array([step[0] for step in ref["fp32"]["logits"]], np.float32)
        diff = float(np.abs(logits_of(a.bundle, pixels, prefix) - want).max())
        good = diff <= a.tol
        ok &= good
        print(f"{what} ({len(prefix)} tokens) vs tract's steps: max diff {diff:.2e}: {'OK' if good else 'FAIL'}")
        summary[f"{key}_fp32_max_diff"] = diff

    summary["ok"] = bool(ok)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
