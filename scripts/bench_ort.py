#!/usr/bin/env python3
"""onnxruntime on the same fast-layout files as `vitgpt2-node bench`, in the same run, and the
ratios tract / onnxruntime.

    .venv-ref/bin/python scripts/bench_ort.py BUNDLE [--int8] [--threads 1,2] [--reps 3]
        [--node target/release/vitgpt2-node]

Measures, per thread count: session load, encoder ms, one decoder step at past lengths
1/8/16/31, a greedy 16-token caption (encoder + 16 steps, forced length) and a beam-4
16-token caption, and onnxruntime's peak RSS (ru_maxrss of this process). Then runs
`vitgpt2-node bench --json` on the bundle and prints both with ratios (tract / ort: < 1 means
tract is faster). `--rounds N` repeats both N times, alternating (the medians of the rounds
are reported), so that a busy machine slows both alike.

`--cold N` also times process start → first caption, N times alternating: `vitgpt2-node
caption` on a 640×480 PNG, and a fresh Python process that imports onnxruntime, opens the
sessions, decodes and resizes the same PNG and runs a greedy caption (this script's
`--first-caption` mode): each a whole process, wall-clock, as a watchdog restart would see it.
"""
import argparse
import json
import os
import resource
import subprocess
import time

import numpy as np
import onnxruntime as ort

PAST = [1, 8, 16, 31]


def ms(t):
    return (time.perf_counter() - t) * 1e3


def fold_constant_transposes(src, dst):
    """The tied LM head is `MatMul(h, Transpose(wte))`: quantize_dynamic only quantizes MatMuls
    whose weight is an initializer, so it would leave onnxruntime's LM head in fp32. Folding the
    Transpose into a second (transposed) initializer gives onnxruntime its best int8 form."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(src)
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Transpose" and n.input[0] in inits:
            perm = next((list(at.ints) for at in n.attribute if at.name == "perm"), None)
            w = numpy_helper.to_array(inits[n.input[0]])
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, dst)
    return dst


def quantize(bundle, out_dir, g, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src = fold_constant_transposes(os.path.join(bundle, f"{g}.onnx"), os.path.join(out_dir, f"{g}_folded.onnx"))
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--node", default="target/release/vitgpt2-node")
    ap.add_argument("--skip-tract", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cold", type=int, default=0, metavar="N")
    ap.add_argument("--first-caption", metavar="IMAGE", help=argparse.SUPPRESS)
    ap.add_argument("--ort-quantize", metavar="DIR",
                    help="run onnxruntime on its own int8 form instead: quantize_dynamic (per channel, QInt8) of the "
                         "fp32 fast graphs, written to DIR once (the baseline of issue #5)")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    suffix = "_int8" if a.int8 else ""
    cfg = json.load(open(os.path.join(a.bundle, "config.json")))
    d = cfg["decoder"]
    n_layer, heads, hd = d["n_layer"], d["n_head"], d["n_embd"] // d["n_head"]
    side = cfg["encoder"]["image_size"]
    pv = np.random.RandomState(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)

    ort_dir, ort_suffix = a.bundle, suffix
    if a.ort_quantize:
        os.makedirs(a.ort_quantize, exist_ok=True)
        for g in ("encoder_fast", "decoder_step"):
            dst = os.path.join(a.ort_quantize, f"{g}_ortq.onnx")
            if not os.path.exists(dst):
                # In a child process, so that neither the quantizer's imports nor its memory
                # count in what this process measures.
                import multiprocessing
                p = multiprocessing.Process(target=quantize, args=(a.bundle, a.ort_quantize, g, dst))
                p.start()
                p.join()
                if p.exitcode != 0:
                    raise SystemExit(f"quantizing {g} failed")
        ort_dir, ort_suffix = a.ort_quantize, "_ortq"

    if a.first_caption:
        return first_caption(a, ort_dir, ort_suffix, n_layer, heads, hd, side)

    if a.rounds == 0 and not a.cold:
        raise SystemExit("--rounds 0 measures nothing without --cold N")
    rounds = []
    for r in range(a.rounds):
        rounds.append(one_round(a, threads, ort_dir, ort_suffix, n_layer, heads, hd, pv))
    # --rounds 0 --cold N: only the cold-start comparison.
    ort_results = merge([x[0] for x in rounds]) if rounds else []
    tract = merge_tract([x[1] for x in rounds]) if rounds else None
    cold = cold_start(a, ort_dir) if a.cold else None
    report(a, ort_results, tract, cold)


def median_of(vals):
    return float(np.median(vals))


def merge(per_round):
    """Per thread count, the median of each measurement over the rounds."""
    out = []
    for i, first in enumerate(per_round[0]):
        rs = [r[i] for r in per_round]
        m = {k: median_of([r[k] for r in rs]) for k in first if k not in ("threads", "token_ms")}
        m["threads"] = first["threads"]
        m["token_ms"] = [[p, median_of([r["token_ms"][j][1] for r in rs])] for j, (p, _) in enumerate(first["token_ms"])]
        out.append(m)
    return out


def merge_tract(per_round):
    if per_round[0] is None:
        return None
    t = dict(per_round[0])
    t["load_ms"] = median_of([r["load_ms"] for r in per_round])
    t["results"] = merge([r["results"] for r in per_round])
    return t


def first_caption(a, ort_dir, ort_suffix, n_layer, heads, hd, side):
    """One caption from a cold process: sessions, image decode and resize, greedy decode."""
    from PIL import Image
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    enc = ort.InferenceSession(os.path.join(ort_dir, f"encoder_fast{ort_suffix}.onnx"), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(os.path.join(ort_dir, f"decoder_step{ort_suffix}.onnx"), so, providers=["CPUExecutionProvider"])
    img = Image.open(a.first_caption).convert("RGB").resize((side, side), Image.BILINEAR)
    pv = ((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    enc_names = [o.name for o in enc.get_outputs()]
    cross = dict(zip(enc_names, enc.run(None, {"pixel_values": pv})))
    dec_names = [o.name for o in dec.get_outputs()]
    past = {f"past.{i}.{kv}": np.zeros((1, heads, 0, hd), np.float32) for i in range(n_layer) for kv in ("key", "value")}
    tok, out = 0, []
    for p in range(a.tokens):
        feed = {"input_ids": np.array([[tok]], np.int64), "position_ids": np.array([[p]], np.int64)}
        feed.update(past)
        feed.update({k: v for k, v in cross.items() if k.startswith("cross.")})
        res = dict(zip(dec_names, dec.run(None, feed)))
        tok = int(np.argmax(res["logits"][0]))
        out.append(tok)
        past = {f"past.{k[8:]}": v for k, v in res.items() if k.startswith("present.")}
    print(out)


def cold_start(a, ort_dir):
    """Process start → first caption, node and onnxruntime alternating; medians in ms."""
    import sys
    import tempfile
    from PIL import Image
    tmp = tempfile.mkdtemp()
    img = os.path.join(tmp, "frame.png")
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8)).save(img)
    me = os.path.abspath(__file__)
    ort_cmd = [sys.executable, me, a.bundle, "--first-caption", img, "--tokens", str(a.tokens)]
    if a.int8:
        ort_cmd.append("--int8")
    if a.ort_quantize:
        ort_cmd += ["--ort-quantize", a.ort_quantize]
    # The same work as the Python side: greedy, exactly `tokens` tokens.
    n = str(a.tokens + 1)
    node_cmd = [a.node, "caption", "--model", a.bundle, "--dtype", "int8" if a.int8 else "fp32", "--threads", "1",
                "--num-beams", "1", "--max-length", n, "--min-length", n, img]
    node, ortt = [], []
    for _ in range(a.cold):
        for cmd, acc in ((node_cmd, node), (ort_cmd, ortt)):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            acc.append(ms(t0))
    return {"node_ms": median_of(node), "ort_ms": median_of(ortt), "runs": a.cold}


def one_round(a, threads, ort_dir, ort_suffix, n_layer, heads, hd, pv):
    ort_results = []
    for t in threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        t0 = time.perf_counter()
        enc = ort.InferenceSession(os.path.join(ort_dir, f"encoder_fast{ort_suffix}.onnx"), so, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(os.path.join(ort_dir, f"decoder_step{ort_suffix}.onnx"), so, providers=["CPUExecutionProvider"])
        load = ms(t0)
        enc_names = [o.name for o in enc.get_outputs()]
        dec_names = [o.name for o in dec.get_outputs()]

        def encode():
            return dict(zip(enc_names, enc.run(None, {"pixel_values": pv})))

        def step(cross, past, toks, pos):
            feed = {"input_ids": np.array(toks, np.int64).reshape(-1, 1), "position_ids": np.full((len(toks), 1), pos, np.int64)}
            feed.update(past)
            feed.update({k: v for k, v in cross.items() if k.startswith("cross.")})
            res = dict(zip(dec_names, dec.run(None, feed)))
            return res["logits"], {f"past.{k[8:]}": v for k, v in res.items() if k.startswith("present.")}

        def empty(rows):
            return {f"past.{i}.{kv}": np.zeros((rows, heads, 0, hd), np.float32) for i in range(n_layer) for kv in ("key", "value")}

        def greedy():
            cross = encode()
            past, tok = empty(1), [0]
            for p in range(a.tokens):
                logits, past = step(cross, past, tok, p)
                tok = [int(np.argmax(logits[0]))]

        def beam4():
            cross = encode()
            past, toks = empty(1), [0]
            scores = np.zeros(1)
            for p in range(a.tokens):
                logits, past = step(cross, past, toks, p)
                lp = logits - logits.max(1, keepdims=True)
                lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
                cand = (scores[:, None] + lp).ravel()
                best = np.argpartition(-cand, 4)[:4]
                rows, toks = best // lp.shape[1], list(best % lp.shape[1])
                scores = cand[best]
                past = {k: v[rows] for k, v in past.items()}

        greedy()  # warm-up
        enc_ms = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            encode()
            enc_ms.append(ms(t0))
        cross = encode()
        per = {p: [] for p in PAST}
        for _ in range(a.reps):
            past, tok = empty(1), [0]
            for p in range(max(PAST) + 1):
                t0 = time.perf_counter()
                _, past = step(cross, past, tok, p)
                if p in per:
                    per[p].append(ms(t0))
                tok = [5 + p % 50]
        g, b = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            greedy()
            g.append(ms(t0))
            t0 = time.perf_counter()
            beam4()
            b.append(ms(t0))
        ort_results.append({
            "threads": t, "load_ms": load, "encoder_ms": float(np.median(enc_ms)),
            "token_ms": [[p, float(np.median(v))] for p, v in per.items()],
            "greedy_caption_ms": float(np.median(g)), "beam4_caption_ms": float(np.median(b)),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
        del enc, dec

    tract = None
    if not a.skip_tract:
        out = subprocess.run([a.node, "bench", "--model", a.bundle, "--threads", a.threads, "--reps", str(a.reps),
                              "--precision", "int8" if a.int8 else "fp32", "--tokens", str(a.tokens), "--json"], check=True, capture_output=True, text=True)
        tract = json.loads(out.stdout.strip().splitlines()[-1])
    return ort_results, tract


def report(a, ort_results, tract, cold):
    print(f"bundle {a.bundle} ({'int8' if a.int8 else 'fp32'}), {a.tokens} tokens")
    for o in ort_results:
        tr = next((r for r in tract["results"] if r["threads"] == o["threads"]), None) if tract else None
        print(f"threads {o['threads']}:            {'tract':>10} {'ort':>10} {'tract/ort':>10}")
        rows = [("load ms", tract["load_ms"] if tract else None, o["load_ms"]), ("encoder ms", tr and tr["encoder_ms"], o["encoder_ms"])]
        for (p, v) in o["token_ms"]:
            tv = next((x[1] for x in tr["token_ms"] if x[0] == p), None) if tr else None
            rows.append((f"token @ past {p} ms", tv, v))
        rows += [("greedy caption ms", tr and tr["greedy_caption_ms"], o["greedy_caption_ms"]),
                 ("beam-4 caption ms", tr and tr["beam4_caption_ms"], o["beam4_caption_ms"]),
                 ("peak RSS MiB", tr and tr["peak_rss_mib"], o["peak_rss_mib"])]
        for name, tv, ov in rows:
            ratio = f"{tv / ov:10.2f}" if tv else f"{'-':>10}"
            print(f"  {name:<20} {tv if tv is not None else float('nan'):10.1f} {ov:10.1f} {ratio}")
    if cold:
        print(f"process start -> first caption ({cold['runs']} runs each, median): node {cold['node_ms']:.0f} ms, "
              f"onnxruntime {cold['ort_ms']:.0f} ms, ratio {cold['node_ms'] / cold['ort_ms']:.2f}")
    print(json.dumps({"ort": ort_results, "tract": tract, "cold": cold}))


if __name__ == "__main__":
    main()
