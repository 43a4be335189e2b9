#!/usr/bin/env python3
"""Requantizes a fast-layout int8 bundle's weights to 7 bits, as `vitgpt2-host export
--reduce-range` would have written them: each `*_int8` matrix q becomes round_half_even(q / 2)
within ±64 and its `*_scale` doubles. For bundles whose checkpoint is not at hand (the shipped
demo): README "Performance" compares the demo's captions from both with it.

It rounds twice (fp32 → 8 bits → 7 bits), so a weight can land one step from where
`--reduce-range` puts it; the export itself quantizes from fp32.

Usage: scripts/requantize_7bit.py SRC_BUNDLE DST_BUNDLE   (needs `onnx` and `numpy`)
"""
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import numpy_helper

GRAPHS = ["encoder_fast_int8.onnx", "decoder_step_int8.onnx"]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    src, dst = sys.argv[1], sys.argv[2]
    if not all(os.path.isfile(os.path.join(src, g)) for g in GRAPHS):
        sys.exit(f"{src}: not a fast-layout int8 bundle (needs {' and '.join(GRAPHS)})")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for g in GRAPHS:
        model = onnx.load(os.path.join(src, g))
        inits = {t.name: t for t in model.graph.initializer}
        done = 0
        for name, t in inits.items():
            scale_name = name[: -len("_int8")] + "_scale" if name.endswith("_int8") else None
            if scale_name not in inits:
                continue
            q = numpy_helper.to_array(t).astype(np.float32)
            # An odd q8 halves to k + 0.5: np.round takes it to the even neighbour.
            q7 = np.clip(np.round(q / 2), -64, 64).astype(np.int8)
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32) * 2
            t.CopyFrom(numpy_helper.from_array(q7, name))
            inits[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
            done += 1
        for prop in model.metadata_props:
            if prop.key == "vitgpt2.weights":
                prop.value = "int8 per-output-channel symmetric, 7-bit (reduce_range)"
        onnx.save(model, os.path.join(dst, g))
        print(f"{g}: {done} matrices to 7 bits")
    print(f"note: {os.path.join(dst, 'manifest.json')} still lists the 8-bit files' sizes and sha256")


if __name__ == "__main__":
    main()
