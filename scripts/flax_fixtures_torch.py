#!/usr/bin/env python3
"""PyTorch stage of scripts/make_flax_fixtures.py: beam references with the current transformers.

Run by make_flax_fixtures.py (not by hand) with the reference venv (.venv-ref: transformers 4.57,
torch), whose beam search is the one vitgpt2's Rust generate() follows: a finished hypothesis'
log-probability sum is divided by (generated length INCLUDING </s>) ** length_penalty. (transformers
4.46's PyTorch beam search, the only PyTorch available next to Flax, divides by the length without
</s> and can rank hypotheses differently; its Flax beam search already used the new rule.)

    .venv-ref/bin/python scripts/flax_fixtures_torch.py HANDOFF_DIR

HANDOFF_DIR (written by the Flax stage) holds, for "original" and "transformers":
  <kind>/model/         VisionEncoderDecoderModel weights (converted from the Flax checkpoint)
  <kind>/inputs.safetensors   per image: pixel_values, flax_logits (full forward on the Flax
                              greedy sequence), decoder_input_ids (that sequence)
  <kind>/job.json       image names, whether the cross-attention is causal, generation cases
and gets <kind>/result.json back. For "original" the GPT-2 cross-attention is patched to be causal
over the image tokens like the original Flax code: decoder position t attends to encoder positions
0..t (additive -1e4 after the 1/sqrt(head_dim) scaling; with a KV cache the query's position is the
cache position). The stage checks that the patched model reproduces the Flax logits and greedy ids
before it records any beam.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

import transformers
from transformers import ViTImageProcessor, VisionEncoderDecoderModel
from transformers.image_utils import load_image
from transformers.models.gpt2 import modeling_gpt2 as pt_gpt2

MASK_VALUE = -1e4

_orig_eager = pt_gpt2.eager_attention_forward
_orig_block_forward = pt_gpt2.GPT2Block.forward


def _patched_eager(module, query, key, value, attention_mask, head_mask=None, **kwargs):
    mode = getattr(module, "vitgpt2_causal_cross", None)
    if module.is_cross_attention and mode is not None:
        q_len, k_len = query.size(-2), key.size(-2)
        offset = getattr(module, "vitgpt2_query_offset", 0)
        qpos = torch.arange(offset, offset + q_len)[:, None]
        kpos = torch.arange(k_len)[None, :]
        fill = torch.finfo(query.dtype).min if mode == "min" else MASK_VALUE
        bias = torch.where(kpos <= qpos, torch.tensor(0.0), torch.tensor(fill)).to(query.dtype)[None, None]
        attention_mask = bias if attention_mask is None else attention_mask + bias
    return _orig_eager(module, query, key, value, attention_mask, head_mask=head_mask, **kwargs)


def _patched_block_forward(self, hidden_states, past_key_values=None, cache_position=None, *args, **kwargs):
    if hasattr(self, "crossattention"):
        self.crossattention.vitgpt2_query_offset = 0 if cache_position is None else int(cache_position[0])
    return _orig_block_forward(self, hidden_states, past_key_values, cache_position, *args, **kwargs)


pt_gpt2.eager_attention_forward = _patched_eager
pt_gpt2.GPT2Block.forward = _patched_block_forward


class CheckFailed(Exception):
    pass


def check(ok, what):
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        raise CheckFailed(what)


def generated(seq, eos):
    out = []
    for t in list(seq)[1:]:
        out.append(int(t))
        if t == eos:
            break
    return out


def run_kind(kind_dir: Path, images_dir: Path):
    job = json.loads((kind_dir / "job.json").read_text())
    inputs = load_file(str(kind_dir / "inputs.safetensors"))
    model = VisionEncoderDecoderModel.from_pretrained(str(kind_dir / "model"), attn_implementation="eager")
    model.eval()
    check(all(type(b.crossattention) is pt_gpt2.GPT2Attention for b in model.decoder.transformer.h)
          and model.config.decoder._attn_implementation == "eager",
          f"{job['kind']}: eager GPT2Attention (the patched attention function)")
    check(torch.equal(model.decoder.lm_head.weight, model.decoder.transformer.wte.weight),
          f"{job['kind']}: lm_head tied to wte")
    proc = ViTImageProcessor(**job["processor"])
    causal = job["causal_cross_attention"]
    g = job["generation"]

    def set_mode(mode):
        for b in model.decoder.transformer.h:
            b.crossattention.vitgpt2_causal_cross = mode

    def logits(pv, ids):
        with torch.no_grad():
            return model(pixel_values=torch.from_numpy(pv), decoder_input_ids=torch.tensor([ids])).logits[0].numpy()

    def gen(pv, use_cache, **kw):
        args = dict(max_length=g["max_length"], do_sample=False, decoder_start_token_id=g["decoder_start_token_id"],
                    bos_token_id=g["decoder_start_token_id"], eos_token_id=g["eos_token_id"],
                    pad_token_id=g["pad_token_id"], use_cache=use_cache, output_scores=True,
                    return_dict_in_generate=True)
        args.update(kw)
        with torch.no_grad():
            out = model.generate(torch.from_numpy(pv), **args)
        score = None if getattr(out, "sequences_scores", None) is None else float(out.sequences_scores[0])
        return generated(out.sequences[0].tolist(), g["eos_token_id"]), score

    result = {"transformers": transformers.__version__, "torch": torch.__version__, "images": {}}
    max_diff = {"1e4": 0.0, "min": 0.0}
    for name in job["images"]:
        pv = inputs[f"{name}/pixel_values"]
        mine = proc(images=load_image(str(images_dir / name)), return_tensors="np").pixel_values
        check(np.array_equal(mine, pv), f"{job['kind']} {name}: transformers {transformers.__version__} "
              f"preprocessing gives the same pixel values bit for bit")
        ids = inputs[f"{name}/decoder_input_ids"].tolist()
        flax_logits = inputs[f"{name}/flax_logits"]
        for mode in (["1e4", "min"] if causal else [None]):
            set_mode(mode)
            d = float(np.abs(logits(pv, ids) - flax_logits).max())
            max_diff["1e4" if mode in (None, "1e4") else "min"] = max(max_diff["1e4" if mode in (None, "1e4") else "min"], d)
            check(d < 1e-4, f"{job['kind']} {name}: torch {'mask ' + mode if mode else ''} logits == Flax "
                  f"(max |diff| {d:.2e})")
        set_mode("1e4" if causal else None)
        flax_greedy = generated(ids, g["eos_token_id"])
        for use_cache in (False, True):
            toks, _ = gen(pv, use_cache, num_beams=1)
            check(toks == flax_greedy, f"{job['kind']} {name}: torch greedy (use_cache={use_cache}) == Flax greedy")
        res = {}
        for case, kw in job["beam_cases"].items():
            toks, score = gen(pv, False, **kw)
            toks_c, score_c = gen(pv, True, **kw)
            check(toks == toks_c and abs(score - score_c) < 1e-4,
                  f"{job['kind']} {name} {case}: same beams with and without the KV cache {toks}")
            res[case] = {"tokens": toks, "sequence_score": score}
        result["images"][name] = res
    result["max_abs_logit_diff_vs_flax"] = max_diff
    return result


def main():
    handoff = Path(sys.argv[1])
    images_dir = Path(sys.argv[2])
    print(f"== PyTorch stage: transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    try:
        for kind in ["original", "transformers"]:
            res = run_kind(handoff / kind, images_dir)
            (handoff / kind / "result.json").write_text(json.dumps(res, indent=1))
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
