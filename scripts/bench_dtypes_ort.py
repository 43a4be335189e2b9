#!/usr/bin/env python3
"""onnxruntime side of scripts/bench_dtypes.sh, and its summary.

    .venv-ref/bin/python scripts/bench_dtypes_ort.py bench BUNDLE --dtype D [--reps 3]
        [--past 1,8,16,31] [--tokens 16] [--images IMAGE...]  # one JSON object on stdout
    .venv-ref/bin/python scripts/bench_dtypes_ort.py summarize RUN_DIR  # summary.json + table.md

`bench` runs onnxruntime (CPU, 1 intra-op and 1 inter-op thread, sequential execution, graph
optimizations ORT_ENABLE_ALL) on exactly the two files the node runs for that dtype in
transformers.js's layout: onnx/encoder_model{suffix}.onnx + onnx/decoder_model_merged{suffix}.onnx,
driven as transformers.js drives a merged decoder (step 0: use_cache_branch=[False] and empty past
[1, heads, 0, head_dim]; later steps [True] with the previous present.*). It mirrors
`vitgpt2-node bench` (src/bench.rs):

- load_ms: creating both sessions;
- encoder_ms: median of --reps encoder runs on the node's test card (gradients and stripes at the
  model's image size);
- token_ms: one decoder step at each past length: per rep a fresh sequence is decoded from the
  start token (then tokens 5 + p % 50, as the node feeds) up to the largest past length, every step
  timed; the median per past length is reported;
- greedy_caption_ms: encoder + --tokens forced greedy steps (end-of-sequence suppressed), after
  one warm-up caption; median of --reps;
- peak_rss_mib: this process's ru_maxrss after the timings (before the captions below, which
  import transformers for the image processor);
- captions: for each IMAGE, an ordinary greedy caption (generation_config.json's max_length,
  stops at </s>) with transformers' ViTImageProcessor + load_image, as the node captions it:
  tokens (without the start token, </s> included), score (sum of log-probabilities / number of
  tokens, the node's greedy score) and the smallest top-1/top-2 logit margin along the path.

`summarize` reads what scripts/bench_dtypes.sh wrote into RUN_DIR (describe.json,
node_bench_<dtype>.jsonl, ort_bench_<dtype>.json, node_caption_<dtype>.jsonl, load.log) and writes
RUN_DIR/summary.json and RUN_DIR/table.md.
"""
import argparse
import glob
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

SUFFIX = {"fp32": "", "q8": "_quantized", "int8": "_int8", "uint8": "_uint8", "fp16": "_fp16", "q4": "_q4"}
ORDER = ["fp32", "fp16", "q8", "int8", "uint8", "q4"]


def ms_since(t):
    return (time.perf_counter() - t) * 1e3


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def graph_paths(bundle: Path, dtype):
    s = SUFFIX[dtype]
    for d in (bundle / "onnx", bundle):
        e, m = d / f"encoder_model{s}.onnx", d / f"decoder_model_merged{s}.onnx"
        if e.exists() and m.exists():
            return e, m
    raise SystemExit(f"{bundle}: no encoder_model{s}.onnx + decoder_model_merged{s}.onnx (in onnx/ or the root)")


def test_card(side):
    """src/bench.rs test_image: R = x*255/side, G = y*255/side, B = 40/220 checkerboard of 8 px."""
    x = np.arange(side, dtype=np.int64)[None, :].repeat(side, 0)
    y = np.arange(side, dtype=np.int64)[:, None].repeat(side, 1)
    r, g = (x * 255 // side).astype(np.uint8), (y * 255 // side).astype(np.uint8)
    b = np.where(((x // 8 + y // 8) % 2) == 0, 40, 220).astype(np.uint8)
    return np.stack([r, g, b], -1)


def card_pixel_values(pre, side):
    """The card is already at the model's size (resizing is the identity): rescale + normalize."""
    a = test_card(side).astype(np.float32) * np.float32(pre.get("rescale_factor", 1 / 255))
    if pre.get("do_normalize", True):
        mean = np.array(pre.get("image_mean", [0.5] * 3), np.float32)
        std = np.array(pre.get("image_std", [0.5] * 3), np.float32)
        a = (a - mean) / std
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None]).astype(np.float32)


class Merged:
    def __init__(self, enc_path, dec_path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t = time.perf_counter()
        self.enc = ort.InferenceSession(str(enc_path), so, providers=["CPUExecutionProvider"])
        self.dec = ort.InferenceSession(str(dec_path), so, providers=["CPUExecutionProvider"])
        self.load_ms = ms_since(t)
        self.out_names = [o.name for o in self.dec.get_outputs()]
        self.past_shapes = {}
        for i in self.dec.get_inputs():
            if i.name.startswith("past_key_values."):
                self.past_shapes[i.name] = [1 if d == "batch_size" else (0 if isinstance(d, str) or d is None else d)
                                            for d in i.shape]
        self.has_branch = any(i.name == "use_cache_branch" for i in self.dec.get_inputs())

    def encode(self, pv):
        return self.enc.run(None, {"pixel_values": pv})[0]

    def session(self, hidden):
        return Steps(self, hidden)


class Steps:
    """transformers.js's loop over a merged decoder, one token at a time."""

    def __init__(self, m: Merged, hidden):
        self.m, self.hidden, self.n = m, hidden, 0
        self.past = {k: np.zeros(s, np.float32) for k, s in m.past_shapes.items()}

    def step(self, tok):
        feed = {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": self.hidden, **self.past}
        if self.m.has_branch:
            feed["use_cache_branch"] = np.array([self.n > 0])
        out = dict(zip(self.m.out_names, self.m.dec.run(None, feed)))
        self.past = {"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        self.n += 1
        return out["logits"][0, -1]


def greedy(m: Merged, pv, start, eos, max_new, forced=False):
    """Returns tokens, log-prob sum, min margin. forced: </s> suppressed, exactly max_new steps."""
    s = m.session(m.encode(pv))
    tok, toks, lp, margins = start, [], 0.0, []
    for _ in range(max_new):
        logits = s.step(tok).astype(np.float64)
        if forced:
            logits[eos] = -np.inf
        tok = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        mx = logits.max()
        lp += float(logits[tok] - mx - np.log(np.exp(logits - mx).sum()))
        toks.append(tok)
        if tok == eos and not forced:
            break
    return toks, lp, margins


def cmd_bench(a):
    bundle = Path(a.bundle)
    enc_path, dec_path = graph_paths(bundle, a.dtype)
    cfg = json.load(open(bundle / "config.json"))
    gen = json.load(open(bundle / "generation_config.json")) if (bundle / "generation_config.json").exists() else {}
    pre = json.load(open(bundle / "preprocessor_config.json"))
    start = gen.get("decoder_start_token_id", cfg.get("decoder_start_token_id", 0))
    eos = gen.get("eos_token_id", cfg.get("eos_token_id", 2))
    max_length = gen.get("max_length", 20)
    side = cfg["encoder"]["image_size"]
    past = [int(p) for p in a.past.split(",")]
    reps = max(1, a.reps)
    rss0 = peak_rss_mib()
    load1 = [os.getloadavg()[0]]

    m = Merged(enc_path, dec_path)
    pv = card_pixel_values(pre, side)
    greedy(m, pv, start, eos, a.tokens, forced=True)  # warm-up
    enc = []
    for _ in range(reps):
        t = time.perf_counter()
        m.encode(pv)
        enc.append(ms_since(t))
    hidden = m.encode(pv)
    per_past = [[] for _ in range(max(past) + 1)]
    for _ in range(reps):
        s = m.session(hidden)
        for p in range(len(per_past)):
            t = time.perf_counter()
            s.step(start if p == 0 else 5 + p % 50)
            per_past[p].append(ms_since(t))
    cap = []
    for _ in range(reps):
        t = time.perf_counter()
        toks, _, _ = greedy(m, pv, start, eos, a.tokens, forced=True)
        cap.append(ms_since(t))
        assert len(toks) == a.tokens
    load1.append(os.getloadavg()[0])
    res = {
        "runtime": "onnxruntime", "version": __import__("onnxruntime").__version__,
        "session": "CPUExecutionProvider, intra_op 1, inter_op 1, ORT_SEQUENTIAL, ORT_ENABLE_ALL",
        "dtype": a.dtype, "graphs": [str(enc_path), str(dec_path)],
        "bytes": os.path.getsize(enc_path) + os.path.getsize(dec_path),
        "load_ms": m.load_ms, "tokens": a.tokens, "reps": reps,
        "encoder_ms": median(enc), "encoder_ms_all": enc,
        "token_ms": [[p, median(per_past[p])] for p in past],
        "greedy_caption_ms": median(cap), "greedy_caption_ms_all": cap,
        "peak_rss_mib": peak_rss_mib(), "rss_before_sessions_mib": rss0,
        "load1_before_after": load1,
    }
    if a.images:
        from transformers import ViTImageProcessor
        from transformers.image_utils import load_image

        proc = ViTImageProcessor.from_pretrained(str(bundle))
        res["captions"] = []
        for path in a.images:
            try:
                ipv = proc(images=load_image(path), return_tensors="np").pixel_values.astype(np.float32)
            except Exception as ex:  # noqa: BLE001 - the node reports unreadable images too
                res["captions"].append({"image": path, "error": f"{type(ex).__name__}: {ex}"})
                continue
            toks, lp, margins = greedy(m, ipv, start, eos, max_length - 1)
            res["captions"].append({"image": path, "tokens": toks, "score": lp / max(1, len(toks)),
                                    "min_margin": min(margins), "min_margin_step": int(np.argmin(margins))})
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------------- summary

def read_jsonl(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def first_error(path):
    if not os.path.exists(path):
        return None
    for line in open(path, errors="replace"):
        s = line.strip()
        if s.lower().startswith("error") or "error:" in s.lower():
            return s
    lines = [line.strip() for line in open(path, errors="replace") if line.strip()]
    return lines[-1] if lines else None


def token_at(token_ms, p):
    for q, v in token_ms:
        if q == p:
            return v
    return None


def compare(caps, ref):
    """Share of images with identical tokens, and max |score difference|, over images both have."""
    ref = {c["image"]: c for c in ref if "tokens" in c}
    same, n, dmax, dmax_same, first_diff = 0, 0, 0.0, 0.0, {}
    for c in caps:
        r = ref.get(c["image"])
        if r is None or "tokens" not in c:
            continue
        n += 1
        eq = c["tokens"] == r["tokens"]
        same += eq
        d = abs(c["score"] - r["score"])
        dmax = max(dmax, d)
        if eq:
            dmax_same = max(dmax_same, d)
        else:
            k = next((i for i, (x, y) in enumerate(zip(c["tokens"], r["tokens"])) if x != y),
                     min(len(c["tokens"]), len(r["tokens"])))
            first_diff[os.path.basename(c["image"])] = k
    return {"images": n, "identical": same, "share_identical": (same / n) if n else None,
            "max_abs_score_diff": dmax if n else None, "max_abs_score_diff_identical_only": dmax_same if same else None,
            "first_differing_step": first_diff}


def fmt(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:,.{nd}f}"


def cmd_summarize(a):
    run = Path(a.run_dir)
    describe = json.load(open(run / "describe.json")) if (run / "describe.json").exists() else {}
    meta = json.load(open(run / "meta.json")) if (run / "meta.json").exists() else {}
    loads = [json.loads(x) for x in open(run / "load.log")] if (run / "load.log").exists() else []
    node_caps = {d: read_jsonl(run / f"node_caption_{d}.jsonl") for d in ORDER}
    fp32_caps = node_caps.get("fp32") or []
    rows, dtypes = [], {}
    for d in ORDER:
        nb = read_jsonl(run / f"node_bench_{d}.jsonl")
        ob = read_jsonl(run / f"ort_bench_{d}.json")
        if not nb and not ob and not (run / f"node_bench_{d}.err").exists():
            continue
        ob = ob[0] if ob else None
        err = None if nb else first_error(run / f"node_bench_{d}.err")
        cap_err = first_error(run / f"node_caption_{d}.err") if not node_caps[d] else None
        caps = [c for c in node_caps[d] if "tokens" in c]
        close = compare(caps, fp32_caps) if fp32_caps else None
        ort_caps = (ob or {}).get("captions", [])
        node_vs_ort = compare(caps, ort_caps) if ort_caps else None
        ort_fp32 = read_jsonl(run / "ort_bench_fp32.json")
        ort_close = compare(ort_caps, ort_fp32[0].get("captions", [])) if ort_fp32 and ort_caps else None
        graphs = next((g for g in describe.get("graph_sets", []) if g["dtype"] == d and g["layout"] == "optimum-merged"), None)
        entry = {"node_bench": nb, "node_error": err, "node_caption_error": cap_err, "ort_bench": ob,
                 "describe": graphs, "greedy_vs_fp32_node": close, "node_vs_ort_same_dtype": node_vs_ort,
                 "ort_greedy_vs_fp32_ort": ort_close,
                 "ort_min_margin": min((c["min_margin"] for c in ort_caps if "min_margin" in c), default=None)}
        dtypes[d] = entry
        by_layout = {}
        for r in nb:
            g = r.get("graphs", "")
            by_layout["optimum" if g.startswith("optimum layout") else "optimum-merged"] = r
        layouts = ["optimum-merged", "optimum"] if d == "fp32" else ["optimum-merged"]
        for lay in layouts:
            r = by_layout.get(lay)
            if lay == "optimum" and r is None:
                continue
            t = r["results"][0] if r else {}
            files = None
            if r:
                files = sum(os.path.getsize(p.strip()) for p in r["graphs"].split(":", 1)[1].split(",") if os.path.exists(p.strip()))
            elif ob:
                files = ob["bytes"]
            is_merged = lay == "optimum-merged"
            runs = "yes" if r else ("no: " + (err or cap_err or "no output")) if not nb else "—"
            rows.append({
                "dtype": d if lay == "optimum-merged" else f"{d} (split)",
                "layout": lay,
                "files_mb": files / 1e6 if files else None,
                "runs_in_node": runs,
                "node_load_ms": r.get("load_ms") if r else None,
                "node_encoder_ms": t.get("encoder_ms"),
                "node_ms_per_token_past16": token_at(t.get("token_ms", []), 16),
                "node_greedy16_ms": t.get("greedy_caption_ms"),
                "node_peak_rss_mib": t.get("peak_rss_mib"),
                "ort_load_ms": ob["load_ms"] if ob and is_merged else None,
                "ort_encoder_ms": ob["encoder_ms"] if ob and is_merged else None,
                "ort_ms_per_token_past16": token_at(ob["token_ms"], 16) if ob and is_merged else None,
                "ort_greedy16_ms": ob["greedy_caption_ms"] if ob and is_merged else None,
                "ort_peak_rss_mib": ob["peak_rss_mib"] if ob and is_merged else None,
                "greedy_eq_fp32_node": (f"{close['identical']}/{close['images']}" if close and is_merged else None),
                "max_abs_score_diff_node": close["max_abs_score_diff"] if close and is_merged else None,
                "node_eq_ort_tokens": (f"{node_vs_ort['identical']}/{node_vs_ort['images']}" if node_vs_ort and is_merged else None),
            })
    l1 = [x["load1"] for x in loads]
    summary = {"run_dir": str(run), "meta": meta, "rows": rows, "dtypes": dtypes, "load_log": loads,
               "load1_max": max(l1) if l1 else None, "load1_min": min(l1) if l1 else None}
    quiet_max = float(os.environ.get("QUIET_MAX_LOAD", "1.5"))
    summary["quiet"] = bool(l1) and max(l1) <= quiet_max
    json.dump(summary, open(run / "summary.json", "w"), indent=1)
    hdr = ["dtype", "files MB", "runs in node", "node load ms", "node encoder ms", "node ms/token (past 16)",
           "ORT load ms", "ORT encoder ms", "ORT ms/token (past 16)", "greedy tokens = fp32 (node)",
           "max abs score diff vs fp32 (node)", "node tokens = ORT tokens (same dtype)", "node / ORT greedy 16 tok ms",
           "node / ORT peak RSS MiB"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        rss = None
        if r["node_peak_rss_mib"] is not None:
            rss = (f"{r['node_peak_rss_mib']:,.0f}" + ("*" if r["layout"] == "optimum" else "") + " / "
                   + (f"{r['ort_peak_rss_mib']:,.0f}" if r["ort_peak_rss_mib"] is not None else "—"))
        g16 = None
        if r["node_greedy16_ms"] is not None:
            g16 = f"{r['node_greedy16_ms']:,.0f} / " + (f"{r['ort_greedy16_ms']:,.0f}" if r["ort_greedy16_ms"] is not None else "—")
        lines.append("| " + " | ".join([
            r["dtype"], fmt(r["files_mb"]), r["runs_in_node"].replace("|", "/"), fmt(r["node_load_ms"], 0),
            fmt(r["node_encoder_ms"], 0), fmt(r["node_ms_per_token_past16"]), fmt(r["ort_load_ms"], 0),
            fmt(r["ort_encoder_ms"], 0), fmt(r["ort_ms_per_token_past16"]), fmt(r["greedy_eq_fp32_node"]),
            fmt(r["max_abs_score_diff_node"], 4), fmt(r["node_eq_ort_tokens"]), fmt(g16), fmt(rss)]) + " |")
    note = (f"\n1 thread; medians of {meta.get('reps', '?')} reps; 1-minute load average during the run "
            f"{fmt(summary['load1_min'], 2)}–{fmt(summary['load1_max'], 2)} on {meta.get('nproc', '?')} CPUs"
            f" ({'quiet' if summary['quiet'] else 'BUSY: timings not final'}, threshold {quiet_max}). "
            f"Closeness over {len(fp32_caps)} images (node greedy captions vs the node's fp32). "
            f"Peak RSS: the process's high-water mark (*: the split layout ran after the merged one in "
            f"the same process, so its figure includes the merged run's peak); onnxruntime's includes "
            f"Python and numpy.\n")
    md = "\n".join(lines) + "\n" + note
    open(run / "table.md", "w").write(md)
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("bundle")
    b.add_argument("--dtype", default="fp32", choices=list(SUFFIX))
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--past", default="1,8,16,31")
    b.add_argument("--tokens", type=int, default=16)
    b.add_argument("--images", nargs="*", default=[], help="images to caption (greedy, stops at </s>)")
    s = sub.add_parser("summarize")
    s.add_argument("run_dir")
    a = ap.parse_args()
    (cmd_bench if a.cmd == "bench" else cmd_summarize)(a)


if __name__ == "__main__":
    main()
