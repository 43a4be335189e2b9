#!/usr/bin/env python3
"""Checks an exported bundle (vitgpt2-host export, fast layout) outside tract:

1. onnx.checker (full check, with shape inference) on every graph, both layouts;
2. onnxruntime runs the graphs, and along a greedy path its encoder output and decoder
   logits (fast layout: decoder_step; Optimum layout: decoder_model on the whole prefix and
   decoder_with_past_model step by step) are compared with transformers' VisionEncoderDecoderModel loaded from the same
   checkpoint (fp32: within --tol; int8: reported, plus argmax agreement).

tract == candle is checked by tests/export_fast.rs and candle == transformers by
tests/candle_model.rs, so this closes the loop for onnxruntime users.

    .venv-ref/bin/python scripts/check_export.py BUNDLE CHECKPOINT [--steps 8] [--tol 1e-4]
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import VisionEncoderDecoderModel


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()

    cfg = json.load(open(os.path.join(a.bundle, "config.json")))
    gen = json.load(open(os.path.join(a.bundle, "generation_config.json")))
    enc_cfg, dec_cfg = cfg["encoder"], cfg["decoder"]
    side = enc_cfg.get("image_size", 224)
    n_layer, heads = dec_cfg["n_layer"], dec_cfg["n_head"]
    hd = dec_cfg["n_embd"] // heads
    start = gen.get("decoder_start_token_id", cfg.get("decoder_start_token_id", 0))

    model = VisionEncoderDecoderModel.from_pretrained(a.checkpoint, attn_implementation="eager").eval()
    pv = np.random.RandomState(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        hf_last = model.encoder(pixel_values=torch.from_numpy(pv)).last_hidden_state.numpy()

    ok = True
    for form, suffix in [("fp32", ""), ("int8", "_int8")]:
        enc_path = os.path.join(a.bundle, f"encoder_fast{suffix}.onnx")
        dec_path = os.path.join(a.bundle, f"decoder_step{suffix}.onnx")
        if not os.path.exists(enc_path):
            continue
        for p in (enc_path, dec_path):
            onnx.checker.check_model(onnx.load(p), full_check=True)
            print(f"{os.path.basename(p)}: onnx.checker OK")
        enc = session(enc_path)
        names = [o.name for o in enc.get_outputs()]
        outs = dict(zip(names, enc.run(None, {"pixel_values": pv})))
        d_enc = float(np.abs(outs["last_hidden_state"] - hf_last).max())
        dec = session(dec_path)
        dec_names = [o.name for o in dec.get_outputs()]
        past = {f"past.{i}.{kv}": np.zeros((1, heads, 0, hd), np.float32) for i in range(n_layer) for kv in ("key", "value")}
        tokens = [start]
        worst, agree = 0.0, 0
        for step in range(a.steps):
            feed = {"input_ids": np.array([[tokens[-1]]], np.int64), "position_ids": np.array([[step]], np.int64)}
            feed.update(past)
            feed.update({k: v for k, v in outs.items() if k.startswith("cross.")})
            res = dict(zip(dec_names, dec.run(None, feed)))
            with torch.no_grad():
                ref = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(res["logits"][0] - ref).max()))
            agree += int(np.argmax(res["logits"][0]) == np.argmax(ref))
            past = {f"past.{k[len('present.'):]}": v for k, v in res.items() if k.startswith("present.")}
            tokens.append(int(np.argmax(ref)))
        print(f"{form}: onnxruntime vs transformers: encoder max|diff| {d_enc:.2e}, logits max|diff| {worst:.2e} over {a.steps} greedy steps, argmax agrees {agree}/{a.steps}")
        if form == "fp32" and (d_enc > a.tol or worst > a.tol):
            print(f"FAIL: fp32 differences above {a.tol}")
            ok = False
    # Optimum layout: decoder_model on the whole prefix, decoder_with_past step by step.
    for form, suffix in [("fp32", ""), ("int8", "_quantized")]:
        paths = [os.path.join(a.bundle, f"{g}{suffix}.onnx") for g in ("encoder_model", "decoder_model", "decoder_with_past_model")]
        if not all(os.path.exists(p) for p in paths):
            continue
        for p in paths:
            onnx.checker.check_model(onnx.load(p), full_check=True)
            print(f"{os.path.basename(p)}: onnx.checker OK")
        enc, dec, dwp = (session(p) for p in paths)
        hidden = enc.run(None, {"pixel_values": pv})[0]
        d_enc = float(np.abs(hidden - hf_last).max())
        dec_names = [o.name for o in dec.get_outputs()]
        dwp_names = [o.name for o in dwp.get_outputs()]
        tokens = [start]
        with torch.no_grad():
            for _ in range(a.steps - 1):
                logits = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=torch.tensor([tokens])).logits[0, -1]
                tokens.append(int(logits.argmax()))
            ref = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=torch.tensor([tokens])).logits[0].numpy()
        full = dict(zip(dec_names, dec.run(None, {"input_ids": np.array([tokens], np.int64), "encoder_hidden_states": hidden})))
        worst_full = float(np.abs(full["logits"][0] - ref).max())
        res = dict(zip(dec_names, dec.run(None, {"input_ids": np.array([[start]], np.int64), "encoder_hidden_states": hidden})))
        worst_step = float(np.abs(res["logits"][0, -1] - ref[0]).max())
        for t in range(1, len(tokens)):
            feed = {"input_ids": np.array([[tokens[t]]], np.int64), "encoder_hidden_states": hidden}
            feed.update({f"past_key_values.{k[len('present.'):]}": v for k, v in res.items() if k.startswith("present.")})
            res = dict(zip(dwp_names, dwp.run(None, feed)))
            worst_step = max(worst_step, float(np.abs(res["logits"][0, -1] - ref[t]).max()))
        print(f"optimum {form}: onnxruntime vs transformers: encoder {d_enc:.2e}, decoder_model on {len(tokens)} tokens {worst_full:.2e}, with-past steps {worst_step:.2e}")
        if form == "fp32" and max(d_enc, worst_full, worst_step) > a.tol:
            print(f"FAIL: fp32 differences above {a.tol}")
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
