#!/usr/bin/env python3
"""onnxruntime's greedy tokens for one Optimum merged bundle and dtype, on this machine (check.mjs's
live reference).

    python tests/js/ort_greedy.py BUNDLE DTYPE IMAGE... > tokens.json

Why live: onnxruntime's 8-bit products with int8 weights and uint8 activations (q8, int8) use
`vpmaddubsw` on x86-64 CPUs without VNNI, which saturates pairs of products to int16, so their
tokens depend on the CPU. The tokens stored in tests/fixtures/interop/reference.json were computed
on a CPU with VNNI (exact); transformers.js runs onnxruntime too and saturates the same way here, so
it is compared with onnxruntime on the same machine, and the stored tokens are reported beside.

The loop is scripts/make_interop_fixtures.py's `ort_greedy_merged` (transformers.js's: step 0 with
use_cache_branch=False and a zero-length past, later steps with the previous present.*), 1 thread.
Images must already be at the model's size (the PIL-resized copies under images/resized32/);
pixel values are `(x/255 − mean)/std` from preprocessor_config.json, and their SHA-256 is printed
so that check.mjs can compare it with the stored one.

Prints one JSON object: {"<image path>": {"tokens": [...], "pixel_values_sha256_f32le": "..."}, ...}.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

SUFFIX = {"fp32": "", "q8": "_quantized", "int8": "_int8", "uint8": "_uint8", "fp16": "_fp16", "q4": "_q4"}
START, EOS, MAX_LENGTH = 0, 2, 20


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def pixel_values(image, pre):
    img = Image.open(image).convert("RGB")
    want = (pre["size"]["width"], pre["size"]["height"])
    if img.size != want:
        sys.exit(f"{image}: {img.size[0]}x{img.size[1]}, expected {want[0]}x{want[1]} (pass the resized32 copies)")
    # As ViTImageProcessor: rescale in float64, then float32, then normalize in float32 (the
    # order that reproduces the stored pixel_values_sha256_f32le bit for bit).
    x = (np.asarray(img, dtype=np.float64) * pre["rescale_factor"]).astype(np.float32)
    x = (x - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def greedy(enc, dec, pv):
    hidden = enc.run(None, {"pixel_values": pv})[0]
    ins = {i.name: i for i in dec.get_inputs()}
    out_names = [o.name for o in dec.get_outputs()]
    past = {}
    for name, i in ins.items():
        if name.startswith("past_key_values."):
            shape = [1 if d == "batch_size" else (0 if isinstance(d, str) or d is None else d) for d in i.shape]
            past[name] = np.zeros(shape, np.float32)
    ids, tok = [], START
    for step in range(MAX_LENGTH - 1):
        feed = {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([step > 0]), **past}
        out = dict(zip(out_names, dec.run(None, feed)))
        tok = int(np.argmax(out["logits"][0, -1]))
        ids.append(tok)
        past = {"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        if tok == EOS:
            break
    return ids


def main():
    bundle, dtype, images = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    pre = json.loads((bundle / "preprocessor_config.json").read_text())
    enc = session(bundle / "onnx" / f"encoder_model{SUFFIX[dtype]}.onnx")
    dec = session(bundle / "onnx" / f"decoder_model_merged{SUFFIX[dtype]}.onnx")
    out = {}
    for image in images:
        pv = pixel_values(image, pre)
        out[image] = {"tokens": greedy(enc, dec, pv),
                      "pixel_values_sha256_f32le": hashlib.sha256(pv.astype("<f4").tobytes()).hexdigest()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
