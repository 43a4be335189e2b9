#!/usr/bin/env python3
"""Save (candle) -> load (transformers) round trip of the host model.

1. Runs the Rust test `save_reload_roundtrip` (tests/candle_model.rs) with
   VITGPT2_ROUNDTRIP_DIR set: it builds a ViT-GPT2 from the pretrained-parts fixtures
   (tests/fixtures/candle/{vit,gpt2}, new cross-attention drawn with seed 0), saves it as
   config.json + model.safetensors, and records candle's logits on the reference batch in
   candle_logits.safetensors.
2. Loads the folder with transformers.VisionEncoderDecoderModel.from_pretrained (no missing or
   unexpected keys allowed), runs the same batch and compares logits.
3. Also compares the GPT-2 and ViT tensors with the original pretrained parts.

Checkpoints trained from a preset (tests/train_loop.rs) and written by `vitgpt2-host convert`
(tests/flax_import.rs) get the same load check, with tokenizers, processor, logits and greedy ids,
from scripts/check_transformers_load.py, which the Rust tests run (VITGPT2_PYTHON).

Run from the repository root (a few minutes: it builds the test binary):
    .venv-ref/bin/python scripts/check_roundtrip.py | tee scripts/check_roundtrip.out
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import transformers
from transformers import GPT2LMHeadModel, ViTModel, VisionEncoderDecoderModel

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "candle"
TOL = 1e-4  # float32, different summation orders: measured differences are ~1e-6


def main():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        env = dict(os.environ, VITGPT2_ROUNDTRIP_DIR=str(out))
        cmd = ["cargo", "test", "--quiet", "--features", "host", "--test", "candle_model", "save_reload_roundtrip", "--", "--exact"]
        print("$", " ".join(cmd))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        print("files written by candle:", sorted(p.name for p in out.iterdir()))

        model, info = VisionEncoderDecoderModel.from_pretrained(str(out), output_loading_info=True)
        model.eval()
        problems = {k: v for k, v in info.items() if v}
        print("transformers loading info (missing/unexpected/mismatched/error):", problems or "all empty")
        assert not problems, problems
        print("enc_to_dec_proj:", hasattr(model, "enc_to_dec_proj"))
        print("lm_head tied to wte:",
              model.decoder.lm_head.weight.data_ptr() == model.decoder.transformer.wte.weight.data_ptr())

        rec = load_file(str(out / "candle_logits.safetensors"))
        with torch.no_grad():
            logits = model(pixel_values=rec["pixel_values"], decoder_input_ids=rec["decoder_input_ids"]).logits
        diff = float((logits - rec["logits"]).abs().max())
        print(f"logits {tuple(logits.shape)}: max |transformers - candle| = {diff:.3e} (tolerance {TOL:g}, max |logit| "
              f"{float(logits.abs().max()):.2f})")
        assert diff < TOL, diff

        # Pretrained tensors survived the trip unchanged.
        vit = ViTModel.from_pretrained(str(FIX / "vit")).state_dict()
        gpt = GPT2LMHeadModel.from_pretrained(str(FIX / "gpt2")).state_dict()
        sd = model.state_dict()
        worst = 0.0
        for k, v in vit.items():
            worst = max(worst, float((sd["encoder." + k] - v).abs().max()))
        for k, v in gpt.items():
            if "crossattention" in k or "ln_cross_attn" in k:
                continue
            worst = max(worst, float((sd["decoder." + k] - v).abs().max()))
        print(f"pretrained tensors ({len(vit)} ViT, {len(gpt)} GPT-2): max |saved - original| = {worst:.3e}")
        assert worst == 0.0
        print(f"OK (transformers {transformers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    sys.exit(main())
