#!/usr/bin/env python3
"""Reference fixtures for importing Flax ViT-GPT2 checkpoints (flax_model.msgpack), made with Flax.

Writes two tiny random checkpoints, saved by the code that wrote the real ones, with reference
outputs of that same code, for the Rust Flax-checkpoint importer's tests:

  tests/fixtures/flax-original/      the "ViT meets GPT-2" project's own format (what
      flax-community/vit-gpt2, French captions, ships): built with the ORIGINAL project's Flax
      classes (FlaxViTGPT2LMForConditionalGeneration from github.com/acul3/vit-gpt2, folder
      vit_gpt2/) and saved with its own save_pretrained: config.json (model_type "vit-gpt2",
      nested vit_config + gpt2_config) + flax_model.msgpack; the tokenizer as
      asi/gpt-fr-cased-small ships it (vocab.json + merges.txt only); a ViTImageProcessor
      preprocessor_config.json for the tiny image size (the real checkpoint folder has none: the
      project took the feature extractor from google/vit-base-patch16-224-in21k).
      reference.json + reference.safetensors: outputs of the original FULL-SEQUENCE forward
      (its cross-attention is causal over the image tokens: decoder position t sees encoder
      positions 0..t), greedy ids from a plain greedy loop over that forward (not the original's
      cached path or generate(), which differ/do not run), and beam-search ids/scores from
      transformers' PyTorch generate() on the converted weights with the same causal
      cross-attention mask patched in (checked equal to the Flax forward first).
  tests/fixtures/flax-transformers/  transformers' own FlaxVisionEncoderDecoderModel (ViT +
      GPT-2, transformers' Flax parameter names; what ydshieh/vit-gpt2-coco-en ships), saved with
      save_pretrained, with the tokenizer files and preprocessor config; references from its own
      Flax forward/generate, cross-checked against
      VisionEncoderDecoderModel.from_pretrained(dir, from_flax=True) (ordinary, non-causal
      cross-attention).
  Each folder also gets params.txt (every msgpack leaf: `path shape dtype`, read back from the
  file with the msgpack package, not with Flax) and a README.md with the measured numbers.

The original code is GPL-3.0 and this repository is Apache-2.0, so it is NOT vendored: the script
loads it from a checkout of https://github.com/acul3/vit-gpt2 at commit ORIGINAL_COMMIT, checks
the SHA-256 of the three files it uses, copies them to a temporary folder and applies two
API-drift patches there (see PATCHES and scripts/flax_original/README.md; neither touches the
forward pass).

Two Python environments. This script runs in .venv-flax (the original code needs the Flax
ViT/GPT-2 of transformers 4.46.3, the last line it imports cleanly; torch is needed next to Flax
for from_pretrained(..., from_flax=True) and for the conversion checks). The beam references
come from scripts/flax_fixtures_torch.py, which this script runs with the reference venv
(.venv-ref: transformers 4.57, whose beam search -- log-prob sum / length INCLUDING </s> -- is
the one vitgpt2 follows); files go back and forth through a temporary folder.

Run from the repository root (deterministic: fixed seeds; same bytes every run apart from
README/reference.json formatting when the script changes):
    git clone https://github.com/acul3/vit-gpt2 /tmp/vit-gpt2 && git -C /tmp/vit-gpt2 checkout 4d1ff6f
    .venv-flax/bin/python scripts/make_flax_fixtures.py --original-src /tmp/vit-gpt2 \
        --ref-python .venv-ref/bin/python
(or set VIT_GPT2_SRC / VITGPT2_REF_PYTHON). About 7 minutes on 2 cores. Environment used
(Python 3.11.7, CPU only, PyPI):
    python3 -m venv .venv-flax
    .venv-flax/bin/pip install jax==0.4.13 jaxlib==0.4.13 flax==0.7.0 transformers==4.46.3 \
        numpy==1.26.4 msgpack pillow torch==2.5.1
(msgpack 1.2.4, pillow 13.0.0, safetensors 0.8.0, tokenizers 0.20.3 came with it); .venv-ref as
for scripts/make_fixtures.py (transformers 4.57.6, torch 2.15.0, pillow 13.0.0).
Every check is asserted; the script exits non-zero if any fails, and nothing is half-written:
outputs go to a temporary folder and replace the fixture folders only when every check passed.
`--readme-only` rewrites the two README.md files from the existing reference.json files.
"""
import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax.core.frozen_dict import unfreeze  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import flax  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    FlaxVisionEncoderDecoderModel,
    GPT2Config,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)
from transformers.image_utils import load_image  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2 as pt_gpt2  # noqa: E402

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT_ORIG = FIX / "flax-original"
OUT_TF = FIX / "flax-transformers"
TOK_SPLIT = FIX / "tiny-vit-gpt2-vocab-merges"  # vocab.json + merges.txt (as asi/gpt-fr-cased-small)
TOK_FULL = FIX / "tiny-vit-gpt2"  # the same tokenizer with tokenizer.json & co.
IMAGES = FIX / "images"
# Varied inputs: a large RGB JPEG, a JPEG with EXIF orientation 6, an RGBA PNG (alpha dropped),
# a 16-colour palette PNG, a very wide lossless WebP.
IMAGE_FILES = ["street.jpg", "portrait_exif6.jpg", "rgba.png", "palette.png", "wide.webp"]
FULL_LOGITS_IMAGES = ["street.jpg"]  # every position's logits stored for these (the others: first step)

IMAGE_SIZE = 32
VOCAB = 420  # the fixture tokenizer's size
START, PAD, EOS = 0, 1, 2  # <s> (decoder start = bos), <pad>, </s>
MAX_LENGTH = 20  # decoder start token included, as transformers' max_length
MASK_VALUE = -1e4  # the original's additive attention mask value

# Flax init seed and redraw seed, final-layer-norm gain and </s> boost of each model: chosen (by a
# search over a few seeds) for clear greedy margins, captions that differ per image, some ending
# with </s> and some running to max_length, and beams that sometimes differ from greedy.
ORIG_SEED, ORIG_LNF, ORIG_EOS_BOOST = 1, 60.0, 12.0
TF_SEED, TF_LNF, TF_EOS_BOOST = 1, 120.0, 18.0
MIN_MARGIN = 0.05  # required top-1/top-2 logit gap at every greedy step

BEAM_CASES = {
    "beam3": dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    "beam4": dict(num_beams=4, length_penalty=1.0, early_stopping=False),
    "beam4_ngram2": dict(num_beams=4, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=2),
}

ORIGINAL_REPO = "https://github.com/acul3/vit-gpt2"
ORIGINAL_COMMIT = "4d1ff6f4e3f6db1d484c953c7dd449ddb12af63f"  # 2021-07-12, last commit
ORIGINAL_FILES = {  # path in the repository -> SHA-256 of the file at ORIGINAL_COMMIT
    "vit_gpt2/configuration_vit_gpt2.py": "f146f02dde8877ca9d56d5cee26b10131911b238f17a76d082b1048d1d281604",
    "vit_gpt2/modeling_flax_gpt2.py": "a3386aad605e0a8f5b22ba152382a3e27f872806a301388d2e344fbbc357561a",
    "vit_gpt2/modeling_flax_vit_gpt2_lm.py": "90ace93502a76266ab8e07bf134b829443c8676bf69b1e68f544cf7f64ba12ed",
}
# (file, old text, new text, why). Each must match exactly once.
PATCHES = [
    (
        "vit_gpt2/modeling_flax_gpt2.py",
        "from transformers.modeling_flax_utils import ACT2FN, FlaxPreTrainedModel, append_call_sample_docstring\n",
        "from transformers.modeling_flax_utils import ACT2FN, FlaxPreTrainedModel\n"
        "def append_call_sample_docstring(*args, **kwargs):  # PATCHED: docstring helper, signature drifted\n"
        "    pass\n",
        "transformers' append_call_sample_docstring changed signature (the 2021 call passes a tokenizer "
        "name first and fails at import); it only edits docstrings, so it is replaced by a no-op",
    ),
    (
        "vit_gpt2/modeling_flax_vit_gpt2_lm.py",
        "        dtype: jnp.dtype = jnp.float32,\n        **kwargs,\n    ):\n        if input_shape is None:",
        "        dtype: jnp.dtype = jnp.float32,\n        _do_init: bool = True,  # PATCHED\n        **kwargs,\n"
        "    ):\n        if input_shape is None:",
        "transformers' FlaxPreTrainedModel.from_pretrained passes _do_init=...; the 2021 __init__ forwarded "
        "it to the Flax module constructor (TypeError). It is now accepted ...",
    ),
    (
        "vit_gpt2/modeling_flax_vit_gpt2_lm.py",
        "            config, module, input_shape=input_shape, seed=seed, dtype=dtype\n        )",
        "            config, module, input_shape=input_shape, seed=seed, dtype=dtype, _do_init=_do_init  # PATCHED\n"
        "        )",
        "... and handed to FlaxPreTrainedModel.__init__ (whether to initialise random weights before loading)",
    ),
]
# Only for the non-causal comparison model (never saved): the cross-attention without its mask.
NONCAUSAL_PATCH = (
    "vit_gpt2/modeling_flax_gpt2.py",
    "        self.encoder_attn = FlaxGPT2Attention(config=self.config, dtype=self.dtype)\n",
    "        self.encoder_attn = FlaxGPT2Attention(config=self.config, dtype=self.dtype, causal=False)\n",
    "comparison only: what an importer that forgot the causal cross-attention mask computes",
)


class CheckFailed(Exception):
    pass


CHECKS = []


def check(ok, what):
    CHECKS.append((bool(ok), what))
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        raise CheckFailed(what)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def f32(x) -> float:
    """A float32 value as the shortest JSON number that reads back (as f32) to the same float32."""
    v = np.float32(x)
    r = float(np.format_float_scientific(v, unique=True))
    if np.float32(r) != v:
        raise CheckFailed(f"float32 {v!r} does not round-trip through {r!r}")
    return r


# ---------------------------------------------------------------------------------------------
# The original code

def load_original(src: Path, tmp: Path, package: str, noncausal: bool = False):
    """Import the original vit_gpt2 package from a checkout, patched in a scratch copy."""
    dst = tmp / package
    dst.mkdir(parents=True)
    (dst / "__init__.py").write_text("")
    for rel, digest in ORIGINAL_FILES.items():
        got = sha256(src / rel)
        check(got == digest, f"original {rel} has the SHA-256 of commit {ORIGINAL_COMMIT[:7]}")
        shutil.copy(src / rel, dst / Path(rel).name)
    for rel, old, new, _why in PATCHES + ([NONCAUSAL_PATCH] if noncausal else []):
        p = dst / Path(rel).name
        text = p.read_text()
        if text.count(old) != 1:
            raise CheckFailed(f"patch does not apply exactly once to {rel}: {old[:60]!r}")
        p.write_text(text.replace(old, new))
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    lm = importlib.import_module(f"{package}.modeling_flax_vit_gpt2_lm")
    cfg = importlib.import_module(f"{package}.configuration_vit_gpt2")
    return lm, cfg


# ---------------------------------------------------------------------------------------------
# Configurations

def vit_config():
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        qkv_bias=True,
    )


def gpt2_config(**kw):
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        add_cross_attention=True,
        bos_token_id=START,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **kw,
    )


def image_processor():
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


PREPROCESSING = {
    "loader": "transformers.image_utils.load_image: PIL open, EXIF orientation applied "
              "(ImageOps.exif_transpose), convert('RGB') (alpha dropped, not composited)",
    "processor": "ViTImageProcessor (preprocessor_config.json in this folder)",
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "resample": "PIL BILINEAR (2) on the uint8 image",
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "pixel_values": "float32 NCHW [1,3,32,32]",
}


def pixel_values(proc, name):
    img = load_image(str(IMAGES / name))
    return proc(images=img, return_tensors="np").pixel_values.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Weights: start from the Flax init of each class, then make the model "opinionated"

def redraw(params, seed, kernel_scale, decoder_prefix, eos_boost):
    """Deterministically rescale kernels and redraw biases and layer norms.

    kernel_scale(path) -> factor for a kernel/embedding/ln_f gain (1.0 keeps the init). Biases
    become N(0, 0.1) and layer-norm scales 1 + N(0, 0.2) so that a wrong bias or scale mapping
    (e.g. the query third of the original's cross-attention c_attn bias) cannot hide behind zeros
    and ones. Then the final layer norm's bias gets eos_boost * wte[</s>] / |wte[</s>]|^2 added,
    which raises the </s> logit by eos_boost everywhere (the tied embedding itself is untouched).
    """
    rs = np.random.RandomState(seed)
    flat = flatten_dict(unfreeze(params))
    out = {}
    for path in sorted(flat):
        v = np.asarray(flat[path], dtype=np.float32)
        name = "/".join(path)
        leaf = path[-1]
        if leaf == "bias":
            v = rs.normal(0.0, 0.1, v.shape).astype(np.float32)
        elif leaf == "scale":
            v = (1.0 + rs.normal(0.0, 0.2, v.shape)).astype(np.float32)
            if path[-2] == "ln_f":
                v = v * np.float32(kernel_scale(name))
        else:
            v = (v * np.float32(kernel_scale(name))).astype(np.float32)
        out[path] = v
    wte = out[decoder_prefix + ("wte", "embedding")][EOS]
    lnf_bias = decoder_prefix + ("ln_f", "bias")
    out[lnf_bias] = (out[lnf_bias] + np.float32(eos_boost) * wte / np.dot(wte, wte)).astype(np.float32)
    return unflatten_dict(out)


def original_kernel_scale(name):
    # transformers' Flax ViT init is tiny (std 0.02/sqrt(fan_in) with truncation): make the image
    # matter; GPT-2's Conv1D init is N(0, 0.02).
    if name.startswith("model/encoder/"):
        if "patch_embeddings" in name:
            return 40.0
        if name.endswith("position_embeddings") or name.endswith("cls_token"):
            return 20.0
        return 25.0
    if "/encoder_attn/" in name:  # the cross-attention: make the image (and its mask) matter
        return 5.0 if "c_proj" not in name else 8.0
    if "/attn/c_proj" in name or "/mlp/c_proj" in name:
        return 3.0
    if name.endswith("wpe/embedding"):
        return 10.0  # positions matter: captions are not one token repeated
    if name.endswith("ln_f/scale"):
        return ORIG_LNF  # logits of several units: margins robust to float noise
    return 1.0  # wte (tied lm head) and the rest keep their init


def tf_kernel_scale(name):
    if name.startswith("encoder/"):
        if "patch_embeddings" in name:
            return 40.0
        if name.endswith("position_embeddings") or name.endswith("cls_token"):
            return 20.0
        return 25.0
    if "/crossattention/" in name:
        return 5.0 if "c_proj" not in name else 8.0
    if "/attn/c_proj" in name or "/mlp/c_proj" in name:
        return 3.0
    if name.endswith("wpe/embedding"):
        return 10.0
    if name.endswith("ln_f/scale"):
        return TF_LNF
    return 1.0


# ---------------------------------------------------------------------------------------------
# The original model's forward and greedy loop

def orig_logits(model, pv, ids):
    """The original FULL-SEQUENCE forward: its __call__ (NCHW pixels, transposed inside)."""
    out = model(pv, np.asarray(ids, dtype=np.int32)[None, :])
    return np.asarray(out.logits[0], dtype=np.float32)


def _decoder_forward(module, input_ids, attention_mask, position_ids, **kw):
    return module._get_decoder_module()(input_ids, attention_mask, position_ids, **kw)


def orig_encoder(model, pv):
    return model.module.apply({"params": model.params}, jnp.transpose(pv, (0, 2, 3, 1)),
                              method=lambda m, x: m._get_encoder_module()(x))


def orig_cached_logits(model, pv, ids):
    """The original's incremental path (NOT a reference): init_cache as its
    prepare_inputs_for_generation does, then one token at a time with the cache. Driven through
    module.apply because its decode() fails (it wraps the decoder's FlaxSeq2SeqLMOutput in a
    FlaxCausalLMOutputWithCrossAttentions and reads a field that does not exist)."""
    enc = orig_encoder(model, pv)
    n = len(ids)
    cache = model.init_cache(1, n, enc)
    out = []
    for t in range(n):
        o, upd = model.module.apply(
            {"params": model.params, "cache": cache}, jnp.array([[ids[t]]], "i4"), jnp.ones((1, n), "i4"),
            jnp.array([[t]], "i4"), encoder_hidden_states=enc[0],
            encoder_attention_mask=jnp.ones(enc[0].shape[:2], "i4"), mutable=["cache"], method=_decoder_forward)
        cache = unfreeze(upd["cache"])
        out.append(np.asarray(o.logits[0, -1], dtype=np.float32))
    return np.stack(out)


def orig_cls_only_logits(model, pv, ids):
    """The original full-sequence decoder given only the CLS token as image."""
    enc = orig_encoder(model, pv)
    o = model.module.apply({"params": model.params}, jnp.array([ids], "i4"), jnp.ones((1, len(ids)), "i4"),
                           jnp.arange(len(ids))[None], encoder_hidden_states=enc[0][:, :1], method=_decoder_forward)
    return np.asarray(o.logits[0], dtype=np.float32)


def greedy_loop(logits_fn, max_length=MAX_LENGTH):
    """Plain greedy decoding that runs the whole sequence every step (no cache)."""
    seq = [START]
    margins = []
    while len(seq) < max_length:
        last = logits_fn(seq)[-1]
        order = np.argsort(-last, kind="stable")
        margins.append(float(last[order[0]] - last[order[1]]))
        seq.append(int(order[0]))
        if seq[-1] == EOS:
            break
    return seq, margins


def sequence_logprob(logits_fn, tokens):
    """Sum of log-softmax(full-forward logits) of `tokens` after <s> (float64 accumulation)."""
    ids = [START] + list(tokens)
    lg = logits_fn(ids).astype(np.float64)[:-1]
    lp = lg - lg.max(axis=1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return float(sum(lp[t, ids[t + 1]] for t in range(len(tokens))))


def generated(seq):
    """Generated ids without the decoder start token, up to and including </s>, no padding."""
    out = []
    for t in list(seq)[1:]:
        out.append(int(t))
        if t == EOS:
            break
    return out


# ---------------------------------------------------------------------------------------------
# PyTorch side: conversion of the original weights, and the causal cross-attention patch

_orig_attn = pt_gpt2.GPT2Attention._attn
_orig_block_forward = pt_gpt2.GPT2Block.forward


def _patched_attn(self, query, key, value, attention_mask=None, head_mask=None):
    causal = getattr(self, "vitgpt2_causal_cross", None)
    if self.is_cross_attention and causal is not None:
        q_len, k_len = query.size(-2), key.size(-2)
        offset = getattr(self, "vitgpt2_query_offset", 0)  # past length with a KV cache
        qpos = torch.arange(offset, offset + q_len)[:, None]
        kpos = torch.arange(k_len)[None, :]
        fill = torch.finfo(query.dtype).min if causal == "min" else MASK_VALUE
        bias = torch.where(kpos <= qpos, torch.tensor(0.0), torch.tensor(fill)).to(query.dtype)
        attention_mask = bias if attention_mask is None else attention_mask + bias
    return _orig_attn(self, query, key, value, attention_mask=attention_mask, head_mask=head_mask)


def _patched_block_forward(self, hidden_states, layer_past=None, *args, **kwargs):
    if hasattr(self, "crossattention"):
        self.crossattention.vitgpt2_query_offset = 0 if layer_past is None else int(layer_past[0].size(-2))
    return _orig_block_forward(self, hidden_states, layer_past, *args, **kwargs)


pt_gpt2.GPT2Attention._attn = _patched_attn
pt_gpt2.GPT2Block.forward = _patched_block_forward


def set_causal_cross(model, mode):
    """mode: None (ordinary transformers), "1e4" (the original's -1e4) or "min" (finfo.min)."""
    for block in model.decoder.transformer.h:
        block.crossattention.vitgpt2_causal_cross = mode


def torch_ved_config(vc, gc):
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vc, gc)
    cfg.decoder_start_token_id = START
    cfg.bos_token_id = START
    cfg.eos_token_id = EOS
    cfg.pad_token_id = PAD
    return cfg


def original_to_torch(flat, E):
    """The original parameter tree -> transformers VisionEncoderDecoderModel state dict.

    The mapping of /work/shared/seed-flax-format.md; every leaf must be used (apart from the
    original cross-attention c_attn's key/value rows, which its forward computes and discards).
    """
    sd = {}
    dropped = []
    for path, v in flat.items():
        p = "/".join(path)
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, copy=True))  # noqa: E731
        if p.startswith("model/encoder/"):
            r = p[len("model/encoder/"):]
            if r == "embeddings/patch_embeddings/projection/kernel":
                sd["encoder.embeddings.patch_embeddings.projection.weight"] = t(v.transpose(3, 2, 0, 1))
            elif r in ("embeddings/cls_token", "embeddings/position_embeddings"):
                sd["encoder." + r.replace("/", ".")] = t(v)
            elif r.endswith("/kernel"):
                sd["encoder." + r[: -len("/kernel")].replace("/", ".") + ".weight"] = t(v.T)
            elif r.endswith("/scale"):
                sd["encoder." + r[: -len("/scale")].replace("/", ".") + ".weight"] = t(v)
            elif r.endswith("/bias"):
                sd["encoder." + r.replace("/", ".")] = t(v)
            else:
                raise CheckFailed(f"unmapped encoder parameter {p}")
        elif p.startswith("model/decoder/transformer/"):
            r = p[len("model/decoder/transformer/"):]
            parts = r.split("/")
            if parts[0] in ("wte", "wpe"):
                sd[f"decoder.transformer.{parts[0]}.weight"] = t(v)
            elif parts[0] == "ln_f":
                sd["decoder.transformer.ln_f." + ("weight" if parts[1] == "scale" else "bias")] = t(v)
            elif parts[0] == "h":
                i, mod = parts[1], parts[2]
                pre = f"decoder.transformer.h.{i}."
                leaf = parts[-1]
                if mod in ("ln_1", "ln_2", "ln_3"):
                    name = {"ln_1": "ln_1", "ln_2": "ln_2", "ln_3": "ln_cross_attn"}[mod]
                    sd[pre + name + "." + ("weight" if leaf == "scale" else "bias")] = t(v)
                elif mod in ("attn", "mlp"):
                    if parts[3] == "c_attn_for_k_v":
                        raise CheckFailed(f"{p}: the self-attention's c_attn_for_k_v is never created")
                    sd[pre + f"{mod}.{parts[3]}." + ("weight" if leaf == "kernel" else "bias")] = t(
                        v.T if leaf == "kernel" else v)
                elif mod == "encoder_attn":
                    sub = parts[3]
                    if sub == "c_attn":  # (3E, E): only the query third is used
                        if leaf == "kernel":
                            sd[pre + "crossattention.q_attn.weight"] = t(v[:E].T)
                        else:
                            sd[pre + "crossattention.q_attn.bias"] = t(v[:E])
                        dropped.append(f"{p}[{E}:{3 * E}]")
                    elif sub == "c_attn_for_k_v":  # (2E, E): key rows then value rows
                        sd[pre + "crossattention.c_attn." + ("weight" if leaf == "kernel" else "bias")] = t(
                            v.T if leaf == "kernel" else v)
                    elif sub == "c_proj":
                        sd[pre + "crossattention.c_proj." + ("weight" if leaf == "kernel" else "bias")] = t(
                            v.T if leaf == "kernel" else v)
                    else:
                        raise CheckFailed(f"unmapped parameter {p}")
                else:
                    raise CheckFailed(f"unmapped parameter {p}")
            else:
                raise CheckFailed(f"unmapped parameter {p}")
        else:
            raise CheckFailed(f"unmapped parameter {p}")
    return sd, dropped


def torch_logits(model, pv, ids):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=torch.tensor([list(ids)]))
    return out.logits[0].numpy()


def torch_generate(model, pv, use_cache, **kw):
    args = dict(max_length=MAX_LENGTH, do_sample=False, decoder_start_token_id=START, bos_token_id=START,
                eos_token_id=EOS, pad_token_id=PAD, use_cache=use_cache, output_scores=True,
                return_dict_in_generate=True)
    args.update(kw)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(pv), **args)
    seq = out.sequences[0].tolist()
    score = None if getattr(out, "sequences_scores", None) is None else float(out.sequences_scores[0])
    return seq, score


# ---------------------------------------------------------------------------------------------
# msgpack: read the files back without Flax

def msgpack_leaves(path: Path):
    """Walk a flax_model.msgpack with the plain msgpack package: (path, shape, dtype, nbytes)."""
    raw = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    leaves = []
    ext_codes = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise CheckFailed(f"non-string map key {k!r} under {prefix}")
                walk(v, prefix + [k])
        elif isinstance(node, msgpack.ExtType):
            ext_codes.add(node.code)
            if node.code != 1:
                raise CheckFailed(f"{'/'.join(prefix)}: ext type {node.code}, expected 1 (ndarray)")
            shape, dtype, data = msgpack.unpackb(node.data, raw=False)
            if not (isinstance(shape, list) and isinstance(dtype, str) and isinstance(data, bytes)):
                raise CheckFailed(f"{'/'.join(prefix)}: ext payload is not [shape, dtype, bytes]")
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if n != len(data):
                raise CheckFailed(f"{'/'.join(prefix)}: {len(data)} bytes for shape {shape} {dtype}")
            leaves.append(("/".join(prefix), tuple(shape), dtype, np.frombuffer(data, dtype=dtype).reshape(shape)))
        else:
            raise CheckFailed(f"{'/'.join(prefix)}: unexpected msgpack node {type(node).__name__}")

    walk(raw, [])
    return raw, leaves, ext_codes


def write_params_txt(msgpack_path: Path, out: Path, header: str):
    raw, leaves, codes = msgpack_leaves(msgpack_path)
    check(codes == {1}, f"{msgpack_path.parent.name}: every leaf is msgpack ext type 1 [shape, dtype, bytes]")
    lines = [f"# {header}", "# path shape dtype  (msgpack map order as stored; shapes as stored)"]
    for p, shape, dtype, _ in leaves:
        lines.append(f"{p} {list(shape)} {dtype}".replace(" ", " ", 1).replace(", ", ","))
    out.write_text("\n".join(lines) + "\n")
    return raw, leaves


# ---------------------------------------------------------------------------------------------

def build_original(lm, cfgmod, out_dir: Path):
    vc, gc = vit_config(), gpt2_config()
    config = cfgmod.ViTGPT2Config.from_vit_gpt2_configs(vc, gc)
    model = lm.FlaxViTGPT2LMForConditionalGeneration(config, seed=ORIG_SEED)
    model.params = redraw(model.params, ORIG_SEED, original_kernel_scale, ("model", "decoder", "transformer"),
                          ORIG_EOS_BOOST)
    model.save_pretrained(str(out_dir))
    # transformers 4.46 also writes generation_config.json; the 2021 code (transformers 4.9) could
    # not, and the real checkpoint folder has none: leave it out.
    gen = out_dir / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return model


def make_original(src: Path, tmp: Path, proc, versions, handoff: Path):
    print("== flax-original: the ViT meets GPT-2 project's own code", flush=True)
    out = tmp / "flax-original"
    out.mkdir()
    lm, cfgmod = load_original(src, tmp / "pkg", "vit_gpt2")
    lm_nc, cfgmod_nc = load_original(src, tmp / "pkg_nc", "vit_gpt2_noncausal", noncausal=True)

    model = build_original(lm, cfgmod, out)
    for name in ["vocab.json", "merges.txt"]:
        shutil.copy(TOK_SPLIT / name, out / name)
    proc.save_pretrained(str(out))
    check(sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "flax_model.msgpack", "vocab.json", "merges.txt", "preprocessor_config.json"]),
        "flax-original holds config.json, flax_model.msgpack, vocab.json, merges.txt, preprocessor_config.json")
    cfg_json = json.loads((out / "config.json").read_text())
    check(cfg_json["model_type"] == "vit-gpt2" and "vit_config" in cfg_json and "gpt2_config" in cfg_json
          and cfg_json["architectures"] == ["ViTGPT2LMForConditionalGeneration"],
          "config.json: model_type vit-gpt2, nested vit_config + gpt2_config")
    vocab = json.loads((out / "vocab.json").read_text())
    check(len(vocab) == VOCAB == cfg_json["gpt2_config"]["vocab_size"] and vocab["<s>"] == START
          and vocab["<pad>"] == PAD and vocab["</s>"] == EOS and vocab["<unk>"] == 3,
          "tokenizer: 420 ids, <s>=0 <pad>=1 </s>=2 <unk>=3, vocab_size matches")

    # Reload from disk with the original's own from_pretrained: all references come from the file.
    model = lm.FlaxViTGPT2LMForConditionalGeneration.from_pretrained(str(out))
    flat = {k: np.asarray(v) for k, v in flatten_dict(unfreeze(model.params)).items()}
    E = model.config.gpt2_config.n_embd
    noncausal = lm_nc.FlaxViTGPT2LMForConditionalGeneration(
        cfgmod_nc.ViTGPT2Config(**json.loads((out / "config.json").read_text())), _do_init=False)

    def noncausal_logits(pv, ids):
        o = noncausal(pv, np.asarray(ids, np.int32)[None], params=model.params)
        return np.asarray(o.logits[0], dtype=np.float32)

    # PyTorch: converted weights, causal cross-attention patched in.
    pt_cfg = torch_ved_config(vit_config(), gpt2_config())
    for c in (pt_cfg, pt_cfg.encoder, pt_cfg.decoder):
        c._attn_implementation = "eager"  # the eager GPT2Attention is the one patched
    pt = VisionEncoderDecoderModel(pt_cfg)
    sd, dropped = original_to_torch(flat, E)
    missing, unexpected = pt.load_state_dict(sd, strict=False)
    check(not unexpected, f"converted state dict: no unexpected keys ({unexpected})")
    check(set(missing) <= {"decoder.lm_head.weight"},
          f"converted state dict: only the tied lm_head left to tie (missing: {missing})")
    pt.tie_weights()
    pt.eval()
    check(torch.equal(pt.decoder.lm_head.weight, pt.decoder.transformer.wte.weight),
          "torch lm_head is tied to wte (the original has no lm_head: logits = hidden . wte^T)")
    check(all(type(b.crossattention) is pt_gpt2.GPT2Attention for b in pt.decoder.transformer.h),
          "torch cross-attention is the eager GPT2Attention (the one patched)")

    ref = {
        "generator": "scripts/make_flax_fixtures.py",
        "format": "flax-original",
        "versions": versions,
        "original_code": {
            "repository": ORIGINAL_REPO,
            "commit": ORIGINAL_COMMIT,
            "files_sha256": ORIGINAL_FILES,
            "patches": [why for (_f, _o, _n, why) in PATCHES],
        },
        "model": "tests/fixtures/flax-original (config.json + flax_model.msgpack)",
        "decoder_start_token_id": START, "bos_token_id": START, "eos_token_id": EOS, "pad_token_id": PAD,
        "max_length": MAX_LENGTH,
        "max_length_note": "counts the decoder start token, like transformers' max_length: at most 19 generated ids",
        "preprocessing": PREPROCESSING,
        "semantics": {
            "forward": "the original FlaxViTGPT2LMForConditionalGeneration.__call__(pixel_values, input_ids) "
                       "(full sequence, attention_mask = ones, position_ids = 0..T-1, no encoder_attention_mask)",
            "cross_attention": "causal over the image tokens: decoder position t attends to encoder positions 0..t "
                               "(position 0 sees only CLS; here 17 encoder tokens, so positions >= 16 see all); "
                               "additive mask -1e4 after scaling scores by 1/sqrt(head_dim)",
            "greedy": "plain loop over the full-sequence forward, whole sequence re-run every step; "
                      "NOT the original's cached path/generate() (its cached cross-attention sees only CLS, "
                      "and generate()/decode() do not run as written)",
            "beams": "transformers' PyTorch generate() (version in beam_reference_versions) on the converted "
                     "weights with the same causal cross-attention mask (-1e4) patched into the GPT-2 attention, "
                     "use_cache=False (every step runs the full sequence; checked equal with a KV cache where "
                     "the query at step t sees encoder positions 0..t); settings recorded per case. The patched "
                     "model's logits and greedy ids were checked equal to the original Flax forward first",
            "tokens": "generated ids without the decoder start token, up to and including </s>, no padding",
        },
        "logits_file": "reference.safetensors",
        "images": [],
    }
    tensors = {}
    handoff_tensors = {}
    beams_446 = {}
    all_margins = []
    max_diff_torch = 0.0
    max_diff_torch_min = 0.0
    causal_vs_noncausal = []
    eos_count = 0
    greedy_set = set()
    for name in IMAGE_FILES:
        pv = pixel_values(proc, name)
        seq, margins = greedy_loop(lambda s: orig_logits(model, pv, s))
        all_margins += margins
        toks = generated(seq)
        greedy_set.add(tuple(toks))
        eos_count += toks[-1] == EOS
        full = orig_logits(model, pv, seq)
        first = orig_logits(model, pv, [START])[0]
        check(np.abs(first - full[0]).max() < 1e-5, f"{name}: first-step logits equal position 0 of the full forward")
        # Non-causal cross-attention (what an importer that forgot the mask computes).
        nc = noncausal_logits(pv, seq)
        diff_nc = float(np.abs(nc - full).max())
        causal_vs_noncausal.append(diff_nc)
        nc_seq, _ = greedy_loop(lambda s: noncausal_logits(pv, s))
        # Torch, unpatched: must equal the Flax non-causal variant; patched: must equal the original.
        set_causal_cross(pt, None)
        pt_plain = torch_logits(pt, pv, seq)
        check(np.abs(pt_plain - nc).max() < 1e-4,
              f"{name}: unpatched torch == original code with a non-causal cross-attention "
              f"(max |diff| {np.abs(pt_plain - nc).max():.2e})")
        set_causal_cross(pt, "1e4")
        pt_causal = torch_logits(pt, pv, seq)
        d = float(np.abs(pt_causal - full).max())
        max_diff_torch = max(max_diff_torch, d)
        set_causal_cross(pt, "min")
        d2 = float(np.abs(torch_logits(pt, pv, seq) - full).max())
        max_diff_torch_min = max(max_diff_torch_min, d2)
        set_causal_cross(pt, "1e4")
        pt_greedy, _ = torch_generate(pt, pv, use_cache=False, num_beams=1)
        pt_greedy_cached, _ = torch_generate(pt, pv, use_cache=True, num_beams=1)
        check(generated(pt_greedy) == toks, f"{name}: patched torch greedy generate == original greedy loop")
        check(generated(pt_greedy_cached) == toks,
              f"{name}: patched torch greedy with KV cache (query t sees encoder 0..t) == same ids")
        with torch.no_grad():
            enc_hidden = pt.encoder(pixel_values=torch.from_numpy(pv)).last_hidden_state[0].numpy()
        enc_flax = np.asarray(orig_encoder(model, pv).last_hidden_state[0])
        if name == IMAGE_FILES[0]:
            cached = orig_cached_logits(model, pv, seq)
            d_cls = float(np.abs(cached - orig_cls_only_logits(model, pv, seq)).max())
            d_full = float(np.abs(cached - full).max())
            check(d_cls < 1e-4 and d_full > 0.1,
                  f"{name}: the original's cached path == its full forward with CLS as the only image token "
                  f"(max |diff| {d_cls:.1e}; {d_full:.2f} from the real full forward): not a reference")
            ref["original_cached_path_check"] = {"file": name, "cached_vs_cls_only_max_abs_logit_diff": f32(d_cls),
                                          "cached_vs_full_forward_max_abs_logit_diff": f32(d_full)}
        check(np.abs(enc_hidden - enc_flax).max() < 1e-4, f"{name}: encoder output torch == flax "
              f"({np.abs(enc_hidden - enc_flax).max():.2e})")
        # transformers 4.46's PyTorch beams, for the record only (see flax_fixtures_torch.py).
        beams_446[name] = {case: generated(torch_generate(pt, pv, use_cache=False, **kw)[0])
                           for case, kw in BEAM_CASES.items()}
        handoff_tensors[f"{name}/pixel_values"] = pv
        handoff_tensors[f"{name}/flax_logits"] = full.astype(np.float32)
        handoff_tensors[f"{name}/decoder_input_ids"] = np.asarray(seq, dtype=np.int64)
        entry = {
            "file": name,
            "pixel_values_sum": f32(pv.sum(dtype=np.float64)),
            "pixel_values_first8": [f32(x) for x in pv.reshape(-1)[:8]],
            "greedy": {"tokens": toks, "ends_with_eos": toks[-1] == EOS,
                       "step_margins": [f32(m) for m in margins], "min_margin": f32(min(margins))},
            "greedy_if_cross_attention_not_causal": generated(nc_seq),
            "first_step_logits": [f32(x) for x in first],
            "decoder_input_ids": [int(x) for x in seq],
            "causal_vs_noncausal_max_abs_logit_diff": f32(diff_nc),
            "flax_vs_patched_torch_max_abs_logit_diff": f32(d),
        }
        if name in FULL_LOGITS_IMAGES:
            entry["full_logits"] = {"tensor": f"{name}/logits", "shape": list(full.shape),
                                    "decoder_input_ids": f"{name}/decoder_input_ids",
                                    "noncausal_logits": f"{name}/noncausal_logits"}
            tensors[f"{name}/logits"] = full.astype(np.float32)
            tensors[f"{name}/noncausal_logits"] = nc.astype(np.float32)  # the flag-off semantics, same weights
            tensors[f"{name}/decoder_input_ids"] = np.asarray(seq, dtype=np.int64)
        tensors[f"{name}/encoder_hidden"] = enc_flax.astype(np.float32)
        ref["images"].append(entry)
        print(f"  {name:20s} greedy={toks} min_margin={min(margins):.3f} causal-vs-noncausal={diff_nc:.3f} "
              f"flax-vs-torch={d:.2e}", flush=True)
    check(min(all_margins) >= MIN_MARGIN, f"original: min greedy margin {min(all_margins):.4f} >= {MIN_MARGIN}")
    check(len(greedy_set) == len(IMAGE_FILES), "original: every image gets a different greedy caption")
    check(1 <= eos_count < len(IMAGE_FILES), f"original: {eos_count} greedy captions end with </s>, others run long")
    check(min(causal_vs_noncausal) > 0.1, f"original: causal vs non-causal cross-attention logits differ by "
          f"{min(causal_vs_noncausal):.3f}..{max(causal_vs_noncausal):.3f} (>> 1e-4)")
    check(max_diff_torch < 1e-4, f"original vs patched torch (-1e4 mask): max |logit diff| {max_diff_torch:.2e} < 1e-4")
    check(max_diff_torch_min < 1e-4, f"original vs patched torch (finfo.min mask): max |logit diff| "
          f"{max_diff_torch_min:.2e} < 1e-4")
    ref["summary"] = {
        "min_greedy_margin": f32(min(all_margins)),
        "causal_vs_noncausal_max_abs_logit_diff": {"min_over_images": f32(min(causal_vs_noncausal)),
                                                   "max_over_images": f32(max(causal_vs_noncausal))},
        "flax_vs_patched_torch_max_abs_logit_diff": {"mask_-1e4": f32(max_diff_torch),
                                                     "mask_finfo_min": f32(max_diff_torch_min)},
        "encoder_attn_c_attn_dropped_rows": dropped,
    }
    write_handoff(handoff / "original", pt, handoff_tensors, causal=True)
    pvs = {name: pixel_values(proc, name) for name in IMAGE_FILES}

    def logprob(name, tokens):
        return sequence_logprob(lambda s: orig_logits(model, pvs[name], s), tokens)
    return ref, tensors, beams_446, logprob


def make_transformers(tmp: Path, proc, versions, handoff: Path):
    print("== flax-transformers: transformers' FlaxVisionEncoderDecoderModel", flush=True)
    out = tmp / "flax-transformers"
    out.mkdir()
    cfg = torch_ved_config(vit_config(), gpt2_config())
    model = FlaxVisionEncoderDecoderModel(cfg, seed=TF_SEED)
    model.params = redraw(model.params, TF_SEED, tf_kernel_scale, ("decoder", "transformer"), TF_EOS_BOOST)
    model.save_pretrained(str(out))
    for name in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(TOK_FULL / name, out / name)
    proc.save_pretrained(str(out))
    cfg_json = json.loads((out / "config.json").read_text())
    check(cfg_json["model_type"] == "vision-encoder-decoder" and cfg_json["decoder"]["add_cross_attention"]
          and cfg_json["decoder_start_token_id"] == START,
          "flax-transformers config.json: vision-encoder-decoder, decoder with cross-attention, start 0")

    model = FlaxVisionEncoderDecoderModel.from_pretrained(str(out))
    pt = VisionEncoderDecoderModel.from_pretrained(str(out), from_flax=True, attn_implementation="eager")
    pt.eval()
    check(torch.equal(pt.decoder.lm_head.weight, pt.decoder.transformer.wte.weight),
          "from_flax torch model: lm_head tied to wte")

    def flax_logits(pv, ids):
        o = model(pixel_values=pv, decoder_input_ids=np.asarray(ids, np.int32)[None])
        return np.asarray(o.logits[0], dtype=np.float32)

    def flax_generate(pv, **kw):
        args = dict(max_length=MAX_LENGTH, decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD)
        args.update(kw)
        o = model.generate(pv, **args)
        seq = np.asarray(o.sequences[0]).tolist()
        score = None if getattr(o, "scores", None) is None else float(np.asarray(o.scores)[0])
        return seq, score

    ref = {
        "generator": "scripts/make_flax_fixtures.py",
        "format": "flax-transformers",
        "versions": versions,
        "model": "tests/fixtures/flax-transformers (config.json + flax_model.msgpack, "
                 "transformers' FlaxVisionEncoderDecoderModel)",
        "decoder_start_token_id": START, "bos_token_id": START, "eos_token_id": EOS, "pad_token_id": PAD,
        "max_length": MAX_LENGTH,
        "max_length_note": "counts the decoder start token, like transformers' max_length: at most 19 generated ids",
        "preprocessing": PREPROCESSING,
        "semantics": {
            "forward": "FlaxVisionEncoderDecoderModel.__call__(pixel_values, decoder_input_ids): ordinary "
                       "(non-causal) cross-attention, causal self-attention",
            "greedy": "FlaxVisionEncoderDecoderModel.generate (num_beams=1), checked equal to a plain loop over "
                      "the full-sequence forward and to the from_flax PyTorch model's generate",
            "beams": "tokens/sequence_score: the PyTorch generate() of the current transformers "
                     "(beam_reference_versions; vitgpt2 follows its rules) on the weights converted by "
                     "VisionEncoderDecoderModel.from_pretrained(dir, from_flax=True). flax_generate_tokens/"
                     "flax_generate_score: FlaxVisionEncoderDecoderModel.generate. They agree (score within "
                     "1e-3) except where Flax's beam search ignores beams that reach max_length without </s> "
                     "once any beam has ended with </s> (listed in summary)",
            "tokens": "generated ids without the decoder start token, up to and including </s>, no padding",
        },
        "logits_file": "reference.safetensors",
        "images": [],
    }
    tensors = {}
    handoff_tensors = {}
    flax_beams = {}
    beams_446 = {}
    all_margins = []
    max_diff = 0.0
    eos_count = 0
    greedy_set = set()
    for name in IMAGE_FILES:
        pv = pixel_values(proc, name)
        seq, margins = greedy_loop(lambda s: flax_logits(pv, s))
        all_margins += margins
        toks = generated(seq)
        greedy_set.add(tuple(toks))
        eos_count += toks[-1] == EOS
        full = flax_logits(pv, seq)
        first = flax_logits(pv, [START])[0]
        g_seq, _ = flax_generate(pv, num_beams=1)
        check(generated(g_seq) == toks, f"{name}: Flax generate greedy == plain greedy loop")
        pt_full = torch_logits(pt, pv, seq)
        d = float(np.abs(pt_full - full).max())
        max_diff = max(max_diff, d)
        pt_seq, _ = torch_generate(pt, pv, use_cache=True, num_beams=1)
        check(generated(pt_seq) == toks, f"{name}: from_flax torch greedy == Flax greedy")
        beams = {}
        beams_446[name] = {}
        for case, kw in BEAM_CASES.items():
            f_seq, f_score = flax_generate(pv, **kw)
            beams[case] = {"tokens": generated(f_seq), "sequence_score": f_score}
            beams_446[name][case] = generated(torch_generate(pt, pv, use_cache=True, **kw)[0])
        flax_beams[name] = beams
        handoff_tensors[f"{name}/pixel_values"] = pv
        handoff_tensors[f"{name}/flax_logits"] = full.astype(np.float32)
        handoff_tensors[f"{name}/decoder_input_ids"] = np.asarray(seq, dtype=np.int64)
        enc_flax = np.asarray(model.encode(pv).last_hidden_state[0])
        entry = {
            "file": name,
            "pixel_values_sum": f32(pv.sum(dtype=np.float64)),
            "pixel_values_first8": [f32(x) for x in pv.reshape(-1)[:8]],
            "greedy": {"tokens": toks, "ends_with_eos": toks[-1] == EOS,
                       "step_margins": [f32(m) for m in margins], "min_margin": f32(min(margins))},
            "first_step_logits": [f32(x) for x in first],
            "decoder_input_ids": [int(x) for x in seq],
            "flax_vs_torch_max_abs_logit_diff": f32(d),
        }
        if name in FULL_LOGITS_IMAGES:
            entry["full_logits"] = {"tensor": f"{name}/logits", "shape": list(full.shape),
                                    "decoder_input_ids": f"{name}/decoder_input_ids"}
            tensors[f"{name}/logits"] = full.astype(np.float32)
            tensors[f"{name}/decoder_input_ids"] = np.asarray(seq, dtype=np.int64)
        tensors[f"{name}/encoder_hidden"] = enc_flax.astype(np.float32)
        ref["images"].append(entry)
        print(f"  {name:20s} greedy={toks} min_margin={min(margins):.3f} flax-vs-torch={d:.2e}", flush=True)
    check(min(all_margins) >= MIN_MARGIN, f"transformers: min greedy margin {min(all_margins):.4f} >= {MIN_MARGIN}")
    check(len(greedy_set) == len(IMAGE_FILES), "transformers: every image gets a different greedy caption")
    check(1 <= eos_count < len(IMAGE_FILES), f"transformers: {eos_count} greedy captions end with </s>, others run long")
    check(max_diff < 1e-4, f"transformers Flax vs from_flax torch: max |logit diff| {max_diff:.2e} < 1e-4")
    ref["summary"] = {"min_greedy_margin": f32(min(all_margins)),
                      "flax_vs_from_flax_torch_max_abs_logit_diff": f32(max_diff)}
    write_handoff(handoff / "transformers", pt, handoff_tensors, causal=False)
    pvs = {name: pixel_values(proc, name) for name in IMAGE_FILES}

    def logprob(name, tokens):
        return sequence_logprob(lambda s: flax_logits(pvs[name], s), tokens)
    return ref, tensors, flax_beams, beams_446, logprob


def write_handoff(d: Path, pt, tensors, causal):
    """Inputs for the PyTorch stage (scripts/flax_fixtures_torch.py, run with .venv-ref)."""
    d.mkdir(parents=True)
    pt.save_pretrained(str(d / "model"), safe_serialization=True)
    save_file(tensors, str(d / "inputs.safetensors"))
    proc = image_processor().to_dict()
    job = {
        "kind": d.name,
        "images": IMAGE_FILES,
        "causal_cross_attention": causal,
        "processor": {k: proc[k] for k in ["do_resize", "size", "resample", "do_rescale", "rescale_factor",
                                           "do_normalize", "image_mean", "image_std"]},
        "generation": {"max_length": MAX_LENGTH, "decoder_start_token_id": START, "eos_token_id": EOS,
                       "pad_token_id": PAD},
        "beam_cases": BEAM_CASES,
    }
    (d / "job.json").write_text(json.dumps(job, indent=1))


def run_torch_stage(handoff: Path, ref_python: str):
    script = Path(__file__).resolve().parent / "flax_fixtures_torch.py"
    print(f"== running {script.name} with {ref_python}", flush=True)
    r = subprocess.run([ref_python, str(script), str(handoff), str(IMAGES)])
    if r.returncode != 0:
        raise CheckFailed(f"{script.name} failed (exit {r.returncode})")
    return {k: json.loads((handoff / k / "result.json").read_text()) for k in ["original", "transformers"]}


def beam_settings(kw):
    return dict(kw, max_length=MAX_LENGTH, do_sample=False, decoder_start_token_id=START, eos_token_id=EOS,
                pad_token_id=PAD)


def finalize_original(ref, torch_res, beams_446, logprob):
    ref["beam_reference_versions"] = {"transformers": torch_res["transformers"], "torch": torch_res["torch"]}
    differ = []
    for e in ref["images"]:
        res = torch_res["images"][e["file"]]
        e["beams"] = {case: {"settings": beam_settings(kw), "tokens": res[case]["tokens"],
                             "sequence_score": f32(res[case]["sequence_score"])} for case, kw in BEAM_CASES.items()}
        for case in BEAM_CASES:
            toks = res[case]["tokens"]
            want = logprob(e["file"], toks) / len(toks)
            check(abs(want - res[case]["sequence_score"]) < 1e-3,
                  f"{e['file']} {case}: beam score {res[case]['sequence_score']:.5f} == log-prob sum of the original "
                  f"full forward / length incl. </s> ({want:.5f})")
        for case in BEAM_CASES:
            if beams_446[e["file"]][case] != res[case]["tokens"]:
                differ.append({"file": e["file"], "case": case, "tokens_transformers_4_46": beams_446[e["file"]][case]})
        print(f"  {e['file']:20s} greedy        {e['greedy']['tokens']}")
        for case in BEAM_CASES:
            print(f"  {'':20s} {case:13s} {e['beams'][case]['tokens']} score={e['beams'][case]['sequence_score']:.4f}")
    ref["summary"]["patched_torch_vs_flax_max_abs_logit_diff_beam_stage"] = {
        k: f32(v) for k, v in torch_res["max_abs_logit_diff_vs_flax"].items()}
    ref["summary"]["beams_that_transformers_4_46_pytorch_would_rank_differently"] = differ
    check(any(e["beams"]["beam4"]["tokens"] != e["greedy"]["tokens"] for e in ref["images"]),
          "original: beam search differs from greedy for at least one image")


def finalize_transformers(ref, torch_res, flax_beams, beams_446, logprob):
    """Beams: PyTorch's (current transformers, = vitgpt2's rules) and Flax generate's own.

    transformers' Flax and PyTorch beam searches score a hypothesis the same way (log-prob sum /
    generated length incl. </s>) but differ in which hypotheses may finish: Flax lets an </s>
    among all 2*num_beams candidates finish (PyTorch: only among the first num_beams), and Flax
    never finishes a beam that reaches max_length without </s> once any beam has ended with </s>
    (PyTorch does). So they can return different sequences, and then Flax's ends with </s>. Both
    returned scores are checked against the log-probs of the Flax forward.
    """
    ref["beam_reference_versions"] = {"transformers": torch_res["transformers"], "torch": torch_res["torch"]}
    differ_446 = []
    differ_flax = []
    max_score_diff = 0.0
    for e in ref["images"]:
        res = torch_res["images"][e["file"]]
        e["beams"] = {}
        for case, kw in BEAM_CASES.items():
            f = flax_beams[e["file"]][case]
            p = res[case]
            want_p = logprob(e["file"], p["tokens"]) / len(p["tokens"])
            check(abs(want_p - p["sequence_score"]) < 1e-3,
                  f"{e['file']} {case}: PyTorch score {p['sequence_score']:.5f} == log-prob sum / length ({want_p:.5f})")
            lp_f = logprob(e["file"], f["tokens"])
            if f["tokens"][-1] == EOS:
                want_f = lp_f / len(f["tokens"])
            else:  # no beam finished: Flax returns running beams with raw (unnormalised) sums
                want_f = lp_f
            check(abs(want_f - f["sequence_score"]) < 1e-3,
                  f"{e['file']} {case}: Flax score {f['sequence_score']:.5f} == its log-prob sum{' / length' if f['tokens'][-1] == EOS else ''} ({want_f:.5f})")
            entry = {"settings": beam_settings(kw), "tokens": p["tokens"], "sequence_score": f32(p["sequence_score"]),
                     "flax_generate_tokens": f["tokens"], "flax_generate_score": f32(f["sequence_score"])}
            if f["tokens"] == p["tokens"]:
                f_norm = f["sequence_score"] / (1 if f["tokens"][-1] == EOS else len(f["tokens"]))
                max_score_diff = max(max_score_diff, abs(f_norm - p["sequence_score"]))
                check(abs(f_norm - p["sequence_score"]) < 1e-3, f"{e['file']} {case}: same tokens, same score "
                      f"(Flax {f_norm:.5f}, PyTorch {p['sequence_score']:.5f})")
            else:
                check(f["tokens"][-1] == EOS, f"{e['file']} {case}: where Flax and PyTorch differ, Flax's beam "
                      f"ended with </s> (a finishing-rule difference)")
                differ_flax.append({"file": e["file"], "case": case, "flax_tokens": f["tokens"],
                                    "flax_score": f32(f["sequence_score"]), "pytorch_score": f32(p["sequence_score"]),
                                    "why": "PyTorch's beam ran to max_length and scores higher: Flax does not "
                                           "finish beams at max_length once one has ended with </s>"
                                    if p["sequence_score"] > f["sequence_score"] else
                                    "Flax's </s> hypothesis scores higher: PyTorch only lets </s> finish among "
                                    "the first num_beams candidates"})
            e["beams"][case] = entry
            if beams_446[e["file"]][case] != p["tokens"]:
                differ_446.append({"file": e["file"], "case": case, "tokens_transformers_4_46": beams_446[e["file"]][case]})
        print(f"  {e['file']:20s} greedy        {e['greedy']['tokens']}")
        for case in BEAM_CASES:
            b = e["beams"][case]
            extra = "" if b["tokens"] == b["flax_generate_tokens"] else \
                f"   Flax generate: {b['flax_generate_tokens']} ({b['flax_generate_score']:.4f})"
            print(f"  {'':20s} {case:13s} {b['tokens']} score={b['sequence_score']:.4f}{extra}")
    ref["summary"]["pytorch_vs_flax_max_abs_logit_diff_beam_stage"] = f32(
        torch_res["max_abs_logit_diff_vs_flax"]["1e4"])
    ref["summary"]["flax_vs_pytorch_max_abs_sequence_score_diff_where_same_tokens"] = f32(max_score_diff)
    ref["summary"]["beams_where_flax_generate_differs_from_pytorch"] = differ_flax
    ref["summary"]["beams_that_transformers_4_46_pytorch_would_rank_differently"] = differ_446
    check(any(e["beams"]["beam4"]["tokens"] != e["greedy"]["tokens"] for e in ref["images"]),
          "transformers: beam search differs from greedy for at least one image")


def compact_json(obj):
    """Indented JSON with every flat list of numbers on one line (keeps the file small)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    # json.dumps(indent=...) puts each list item on its own line; a "[" inside a string is never
    # followed by a raw newline, so only real lists match.
    return re.sub(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def write_reference(out: Path, ref, tensors):
    save_file(tensors, str(out / "reference.safetensors"))
    os.chmod(out / "reference.safetensors", 0o644)
    text = compact_json(ref)
    if json.loads(text) != json.loads(json.dumps(ref)):
        raise CheckFailed("compact JSON does not read back to the same data")
    (out / "reference.json").write_text(text)


def verify_saved(src: Path, tmp: Path, orig_dir: Path, tf_dir: Path, proc):
    """Reload everything from the written files and recompute the recorded references."""
    print("== verify: reload the saved files and recompute", flush=True)
    lm, _ = load_original(src, tmp / "pkg_verify", "vit_gpt2_verify")
    for d, kind in [(orig_dir, "original"), (tf_dir, "transformers")]:
        ref = json.loads((d / "reference.json").read_text())
        tens = load_file(str(d / "reference.safetensors"))
        if kind == "original":
            model = lm.FlaxViTGPT2LMForConditionalGeneration.from_pretrained(str(d))
            fwd = lambda pv, ids: orig_logits(model, pv, ids)  # noqa: E731
        else:
            model = FlaxVisionEncoderDecoderModel.from_pretrained(str(d))
            fwd = lambda pv, ids: np.asarray(model(pixel_values=pv, decoder_input_ids=np.asarray(  # noqa: E731
                ids, np.int32)[None]).logits[0])
        # Parameters read with plain msgpack equal the ones Flax loads.
        _, leaves, _ = msgpack_leaves(d / "flax_model.msgpack")
        flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(unfreeze(model.params)).items()}
        check(set(flat) == {p for p, *_ in leaves} and all(np.array_equal(flat[p], a) for p, _, _, a in leaves),
              f"{kind}: msgpack leaves read without Flax == the parameters Flax loads")
        for e in ref["images"]:
            pv = pixel_values(proc, e["file"])
            check(abs(pv.sum(dtype=np.float64) - e["pixel_values_sum"]) < 1e-3, f"{kind} {e['file']}: pixel sum")
            first = fwd(pv, [START])[0]
            check(np.abs(first - np.asarray(e["first_step_logits"], np.float32)).max() < 1e-5,
                  f"{kind} {e['file']}: first-step logits recomputed")
            seq, margins = greedy_loop(lambda s: fwd(pv, s))
            check(generated(seq) == e["greedy"]["tokens"], f"{kind} {e['file']}: greedy recomputed")
            if kind == "transformers":
                for case, b in e["beams"].items():
                    o = model.generate(pv, **{k: v for k, v in b["settings"].items() if k != "do_sample"})
                    check(generated(np.asarray(o.sequences[0]).tolist()) == b["flax_generate_tokens"],
                          f"{kind} {e['file']} {case}: Flax beams recomputed")
            if "full_logits" in e:
                ids = tens[e["full_logits"]["decoder_input_ids"]].tolist()
                check(ids == e["decoder_input_ids"], f"{kind} {e['file']}: stored decoder input ids")
                got = fwd(pv, ids)
                check(np.abs(got - tens[e["full_logits"]["tensor"]]).max() < 1e-5,
                      f"{kind} {e['file']}: every position's logits recomputed")


def ids_table(ref):
    rows = ["| image | greedy | " + " | ".join(BEAM_CASES) + " |", "|---|---|" + "---|" * len(BEAM_CASES)]
    for e in ref["images"]:
        cells = [" ".join(map(str, e["greedy"]["tokens"]))]
        cells += [" ".join(map(str, e["beams"][c]["tokens"])) + f" ({e['beams'][c]['sequence_score']:.4f})"
                  for c in BEAM_CASES]
        rows.append(f"| {e['file']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def files_table(d: Path, notes):
    rows = ["| file | bytes | what |", "|---|---|---|"]
    for name in sorted(notes):
        size = (d / name).stat().st_size if (d / name).exists() else 0
        rows.append(f"| `{name}` | {size} | {notes[name]} |")
    return "\n".join(rows)


def versions_line(v):
    return ", ".join(f"{k} {x}" for k, x in v.items())


REGENERATE = """```
git clone https://github.com/acul3/vit-gpt2 /tmp/vit-gpt2 && git -C /tmp/vit-gpt2 checkout 4d1ff6f
.venv-flax/bin/python scripts/make_flax_fixtures.py --original-src /tmp/vit-gpt2 \\
    --ref-python .venv-ref/bin/python
```
(.venv-flax: `pip install jax==0.4.13 jaxlib==0.4.13 flax==0.7.0 transformers==4.46.3 numpy==1.26.4
msgpack pillow torch==2.5.1`; .venv-ref: the reference venv of `scripts/make_fixtures.py`.) The
script checks everything listed below and exits non-zero if anything fails; it writes both fixture
folders (README included) only when all checks pass."""

MSGPACK_NOTE = """`flax_model.msgpack` is `flax.serialization.to_bytes(params)`: one msgpack map, nested maps by
module name, layer indices as string keys ("0", "1"), string keys only. Every leaf is a msgpack
extension of type 1 whose payload is itself msgpack: `[shape (array of ints), dtype name
("float32"), raw C-order little-endian bytes]`; byte length = product(shape) x dtype size. No
other extension types occur (Flax also defines 2 = complex and 3 = numpy scalar). `params.txt`
lists every leaf (`path shape dtype`) in the stored map order, read back with the plain msgpack
package; the script checks that these equal what Flax loads. The order is alphabetical (JAX
flattens dicts in sorted key order, so Flax trees come out sorted, "10" before "2"); an importer
should look keys up by name, not rely on the order."""


def write_readmes(orig_dir: Path, tf_dir: Path, ref_o, ref_t):
    so, st = ref_o["summary"], ref_t["summary"]
    eos_o = [e["file"] for e in ref_o["images"] if e["greedy"]["ends_with_eos"]]
    eos_t = [e["file"] for e in ref_t["images"] if e["greedy"]["ends_with_eos"]]
    b446_o = so["beams_that_transformers_4_46_pytorch_would_rank_differently"]
    b446_t = st["beams_that_transformers_4_46_pytorch_would_rank_differently"]
    flax_diff = st["beams_where_flax_generate_differs_from_pytorch"]
    orig_files = {
        "config.json": "written by the original `ViTGPT2Config` (model_type `vit-gpt2`, nested `vit_config` and "
                       "`gpt2_config`, `architectures: [ViTGPT2LMForConditionalGeneration]`, no top-level token ids)",
        "flax_model.msgpack": "the original's `save_pretrained` (`flax.serialization.to_bytes`), tree in `params.txt`",
        "vocab.json": "the fixture tokenizer (byte-level BPE, 420 ids, `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3)",
        "merges.txt": "its merges; no tokenizer.json, as asi/gpt-fr-cased-small ships it",
        "preprocessor_config.json": "ViTImageProcessor for 32x32 (bilinear, 1/255, mean = std = 0.5)",
        "params.txt": "every msgpack leaf: `path shape dtype`",
        "reference.json": "inputs, settings and outputs (below)",
        "reference.safetensors": "per-position logits, non-causal logits, encoder outputs (below)",
    }
    text = f"""# flax-original: a tiny checkpoint in the "ViT meets GPT-2" project's own Flax format

A tiny random ViT-GPT2 (image 32, patch 8, ViT width 32 / 2 layers / 4 heads / MLP 64; GPT-2 width
32 / 2 layers / 4 heads, 64 positions, vocabulary 420) built with the ORIGINAL project's Flax
classes (`FlaxViTGPT2LMForConditionalGeneration`, github.com/acul3/vit-gpt2 folder `vit_gpt2/`,
commit `4d1ff6f`, the code of flax-community/vit-gpt2, French captions) and saved with its own
`save_pretrained`, with reference outputs of that same code. For the Rust Flax-checkpoint importer.

{files_table(orig_dir, orig_files)}

The real flax-community/vit-gpt2 checkpoint folders (e.g. `checkpoints/ckpt_5/`, the one its demo
downloads) hold only `config.json` + `flax_model.msgpack`: the demo takes the tokenizer from
asi/gpt-fr-cased-small (`vocab.json` + `merges.txt`) and the feature extractor from
google/vit-base-patch16-224-in21k (224x224, bilinear, mean = std = 0.5; an old-style
`ViTFeatureExtractor` config). transformers 4.46's `save_pretrained` also writes a
`generation_config.json`, which 2021 code could not: it is deleted here.

## How it was made

{REGENERATE}

Versions: {versions_line(ref_o["versions"])}; beams: transformers
{ref_o["beam_reference_versions"]["transformers"]}, torch {ref_o["beam_reference_versions"]["torch"]}.

The original code is GPL-3.0 and is not copied into this repository: the script loads it from a
checkout, checks the SHA-256 of the three files it uses, and patches a scratch copy for two API
drifts, neither in the forward pass (see `scripts/flax_original/README.md`):
1. `append_call_sample_docstring` (a docstring decorator whose signature changed) becomes a no-op;
2. the model's `__init__` accepts `_do_init` (passed by today's `from_pretrained`) and hands it to
   `FlaxPreTrainedModel.__init__`.

Weights: the original class's own init (seed {ORIG_SEED}), then kernels scaled (ViT x20..x40 because
transformers' Flax ViT init is 0.02/sqrt(fan_in); cross-attention x5, its c_proj x8; self-attention
and MLP c_proj x3; wpe x10; the tied embedding `wte` untouched), every bias redrawn N(0, 0.1), every
layer-norm scale 1 + N(0, 0.2) (ln_f's also x{ORIG_LNF:g}), and {ORIG_EOS_BOOST:g} x wte[</s>] / |wte[</s>]|^2
added to ln_f's bias (raises the </s> logit by {ORIG_EOS_BOOST:g}). Biases and scales are random so a
wrong bias/scale mapping cannot hide behind zeros and ones.

## What the references are

- Pixels: `transformers.image_utils.load_image` (EXIF orientation applied, `convert("RGB")`, alpha
  dropped) + the ViTImageProcessor of `preprocessor_config.json`; NCHW float32 given to the original
  `__call__`, which transposes to NHWC. `pixel_values_sum` / `pixel_values_first8` are checksums.
- Forward: the original `__call__(pixel_values, input_ids)`, the FULL-SEQUENCE forward that training
  used (attention mask all ones, positions 0..T-1). Its cross-attention is **causal over the image
  tokens**: `encoder_attn` is GPT-2's attention with its default causal mask, so decoder position t
  attends to encoder positions 0..t only (position 0 sees only CLS; with 17 image tokens here,
  positions >= 16 see all). Mask: additive -1e4 after scaling scores by 1/sqrt(head_dim).
- The original's cached path is NOT the reference: its `encoder_attn` keeps no cache, so with one
  query at a time the causal mask's first row is used at every step and each step sees only CLS
  (checked: cached logits == logits with CLS as the only image token); its `generate()`/`decode()`
  do not run as written with transformers 4.46 (`decode` builds a FlaxCausalLMOutputWithCrossAttentions
  from a FlaxSeq2SeqLMOutput; `encode` casts pixel values to int32 and skips the NCHW->NHWC transpose).
- Greedy: a plain loop that re-runs the whole sequence each step; max_length {MAX_LENGTH} counts the
  start token `<s>`=0 (at most 19 generated ids); stops at `</s>`=2. `tokens` exclude the start
  token and include `</s>`.
- Beams: the weights converted to a PyTorch `VisionEncoderDecoderModel` (mapping below), with the
  same causal cross-attention mask (-1e4) patched into GPT-2's attention; the patched model's
  logits were checked equal to the Flax forward (max |diff| {so["flax_vs_patched_torch_max_abs_logit_diff"]["mask_-1e4"]:.2e}
  with -1e4 under transformers 4.46, {so["patched_torch_vs_flax_max_abs_logit_diff_beam_stage"]["1e4"]:.2e} under
  {ref_o["beam_reference_versions"]["transformers"]}; with finfo.min instead of -1e4:
  {so["flax_vs_patched_torch_max_abs_logit_diff"]["mask_finfo_min"]:.2e} / {so["patched_torch_vs_flax_max_abs_logit_diff_beam_stage"]["min"]:.2e}) and its
  greedy ids equal to the Flax loop's, with and without a KV cache (query at step t sees encoder
  positions 0..t). Then `generate()` of transformers {ref_o["beam_reference_versions"]["transformers"]} (use_cache=False, also
  checked equal with the cache): num_beams 3 and 4, length_penalty 1.0, early_stopping false, and
  num_beams 4 with no_repeat_ngram_size 2; `sequence_score` is its `sequences_scores` (log-prob sum
  / generated length including `</s>`, the rule vitgpt2's generate follows). transformers 4.46's
  PyTorch beam search divides by the length without `</s>`; {"it gives the same ids in all " + str(len(ref_o["images"]) * len(BEAM_CASES)) + " cases here" if not b446_o else "it ranks " + str(len(b446_o)) + " case(s) differently (listed in `summary`)"}.

## Numbers (measured by the script)

- Minimum top-1/top-2 logit margin over every greedy step of every image: **{so["min_greedy_margin"]:.4f}**.
- Causal vs non-causal cross-attention (the original code with `causal=False` on `encoder_attn`,
  equal to unpatched transformers): max |logit diff| per image {so["causal_vs_noncausal_max_abs_logit_diff"]["min_over_images"]:.2f} .. {so["causal_vs_noncausal_max_abs_logit_diff"]["max_over_images"]:.2f}
  (`greedy_if_cross_attention_not_causal` differs for every image).
- Greedy captions ending with `</s>`: {", ".join(eos_o) or "none"}; the others run to max_length.

Token ids (greedy; beams with `sequence_score`):

{ids_table(ref_o)}

## reference.json / reference.safetensors

`reference.json`: settings, preprocessing, `semantics`, `summary`, and per image: `file`,
`pixel_values_sum`, `pixel_values_first8`, `greedy` (`tokens`, `ends_with_eos`, `step_margins`,
`min_margin`), `greedy_if_cross_attention_not_causal`, `first_step_logits` (420 floats: logits
after `<s>` alone), `decoder_input_ids` (`<s>` + greedy tokens), `beams.<case>` (`settings`,
`tokens`, `sequence_score`), and for {", ".join(FULL_LOGITS_IMAGES)} `full_logits` naming tensors of
`reference.safetensors`: `<file>/logits` [T, 420] (the forward on `<file>/decoder_input_ids`, every
position), `<file>/noncausal_logits` (the same without the cross-attention mask). Every image also
has `<file>/encoder_hidden` [17, 32] (ViT last hidden state after the final layer norm, for
debugging the encoder alone).

## Parameter names and the mapping to transformers

{MSGPACK_NOTE}

Top-level key `model` -> `encoder` (transformers' Flax ViT, pooler included: stored, computed, unused)
and `decoder` (`transformer/...`, no `lm_head`: `tie_word_embeddings`, logits = ln_f(h) . wte^T).
GPT-2 "Conv1D" kernels are stored (out, in) and applied as x . kernel^T; ViT Dense kernels are
(in, out); the patch kernel is HWIO (8, 8, 3, 32); layer norms have `scale`/`bias`. E = 32 here.
The conversion to transformers' `VisionEncoderDecoderModel` that the script uses (checked by the
logits above; `original_to_torch` in the script):

| original (under `model/`) | transformers | how |
|---|---|---|
| `encoder/embeddings/patch_embeddings/projection/kernel` (P,P,3,E) | `encoder.embeddings.patch_embeddings.projection.weight` (E,3,P,P) | transpose (3,2,0,1) |
| `encoder/embeddings/{{cls_token,position_embeddings}}` | same names | copy |
| `encoder/**/kernel` (Dense, in x out) | `encoder.**.weight` | transpose |
| `encoder/**/{{scale,bias}}` | `encoder.**.{{weight,bias}}` | copy |
| `decoder/transformer/{{wte,wpe}}/embedding` | `decoder.transformer.{{wte,wpe}}.weight` | copy; `lm_head` tied to `wte` |
| `decoder/transformer/{{ln_f,h/i/ln_1,h/i/ln_2}}` | same names | copy |
| `decoder/transformer/h/i/ln_3` | `h.i.ln_cross_attn` | copy |
| `h/i/attn/{{c_attn,c_proj}}`, `h/i/mlp/{{c_fc,c_proj}}` kernel (out,in) | same names, Conv1D weight (in,out) | transpose |
| `h/i/encoder_attn/c_attn` kernel rows 0..E, bias 0..E | `h.i.crossattention.q_attn` | first third, transpose |
| `h/i/encoder_attn/c_attn` rows E..3E | none | computed and discarded by the original: dropped |
| `h/i/encoder_attn/c_attn_for_k_v` (2E,E): key rows, then value rows | `h.i.crossattention.c_attn` (E,2E) | transpose |
| `h/i/encoder_attn/c_proj` | `h.i.crossattention.c_proj` | transpose |

The self-attention has no `c_attn_for_k_v` (declared, never called, so never created).
"""
    (orig_dir / "README.md").write_text(text)

    tf_files = {
        "config.json": "transformers' VisionEncoderDecoderConfig (model_type `vision-encoder-decoder`, "
                       "`encoder` ViT, `decoder` GPT-2 with add_cross_attention, decoder_start_token_id 0)",
        "generation_config.json": "written by transformers' save_pretrained (start/bos 0, eos 2, pad 1)",
        "flax_model.msgpack": "FlaxVisionEncoderDecoderModel.save_pretrained, tree in `params.txt`",
        "vocab.json": "the fixture tokenizer (byte-level BPE, 420 ids, `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3)",
        "merges.txt": "its merges",
        "tokenizer.json": "the same tokenizer as a tokenizers file",
        "tokenizer_config.json": "GPT2Tokenizer settings",
        "special_tokens_map.json": "special tokens",
        "preprocessor_config.json": "ViTImageProcessor for 32x32 (bilinear, 1/255, mean = std = 0.5)",
        "params.txt": "every msgpack leaf: `path shape dtype`",
        "reference.json": "inputs, settings and outputs (as in ../flax-original, without the non-causal parts)",
        "reference.safetensors": "per-position logits and encoder outputs",
    }
    text = f"""# flax-transformers: a tiny checkpoint in transformers' FlaxVisionEncoderDecoderModel format

A tiny random ViT + GPT-2 `FlaxVisionEncoderDecoderModel` (same sizes as ../flax-original), saved
with transformers' `save_pretrained`: the format and parameter names of the English sibling
ydshieh/vit-gpt2-coco-en (which ships `config.json`, `flax_model.msgpack`, `pytorch_model.bin`, the
GPT-2 tokenizer files and a `preprocessor_config.json`). Ordinary semantics: the cross-attention
is NOT causal. For the Rust Flax-checkpoint importer.

{files_table(tf_dir, tf_files)}

## How it was made

{REGENERATE}

Versions: {versions_line(ref_t["versions"])}; PyTorch beams: transformers
{ref_t["beam_reference_versions"]["transformers"]}, torch {ref_t["beam_reference_versions"]["torch"]}.

Weights: transformers' Flax init (seed {TF_SEED}), then the same recipe as ../flax-original (ln_f x{TF_LNF:g},
</s> logit raised by {TF_EOS_BOOST:g} through ln_f's bias; the tied `wte` untouched).

## What the references are

- Pixels: as in ../flax-original (`load_image` + `preprocessor_config.json`).
- Forward: `FlaxVisionEncoderDecoderModel(pixel_values, decoder_input_ids)`; the PyTorch model from
  `VisionEncoderDecoderModel.from_pretrained(dir, from_flax=True)` gives the same logits (max |diff|
  {st["flax_vs_from_flax_torch_max_abs_logit_diff"]:.2e} under transformers 4.46, {st["pytorch_vs_flax_max_abs_logit_diff_beam_stage"]:.2e} under {ref_t["beam_reference_versions"]["transformers"]}).
- Greedy: Flax `generate` (num_beams 1) == a plain loop over the full forward == PyTorch `generate`.
- Beams: `tokens`/`sequence_score` are PyTorch `generate()` of transformers {ref_t["beam_reference_versions"]["transformers"]}
  (the rules vitgpt2 follows) on the from_flax weights; `flax_generate_tokens`/`flax_generate_score`
  are `FlaxVisionEncoderDecoderModel.generate`. Same settings as ../flax-original. Both score a
  hypothesis the same way (log-prob sum / generated length including `</s>`; checked against the
  Flax forward's log-probs for every returned sequence) but differ in which hypotheses may finish:
  Flax lets `</s>` finish among all 2 x num_beams candidates (PyTorch: only among the first
  num_beams) and never finishes a beam that reaches max_length once another has ended with `</s>`
  (PyTorch does; if no beam finished, Flax returns an unnormalised running sum). They agree
  (scores within {st["flax_vs_pytorch_max_abs_sequence_score_diff_where_same_tokens"]:.1e}) except in {len(flax_diff)} case(s): {"; ".join(d["file"] + " " + d["case"] + ": " + d["why"] for d in flax_diff) or "none"}.
  transformers 4.46's PyTorch beam search (which divides by the length without `</s>`)
  {"gives the same ids in every case here" if not b446_t else "ranks " + str(len(b446_t)) + " case(s) differently (listed in `summary`)"}.

## Numbers (measured by the script)

- Minimum top-1/top-2 logit margin over every greedy step of every image: **{st["min_greedy_margin"]:.4f}**.
- Greedy captions ending with `</s>`: {", ".join(eos_t) or "none"}; the others run to max_length.

Token ids (greedy; PyTorch beams with `sequence_score`):

{ids_table(ref_t)}

## Parameter names

{MSGPACK_NOTE}

Top level: `encoder` (FlaxViTModule: `embeddings`, `encoder/layer/i`, `layernorm`, `pooler`) and
`decoder` (FlaxGPT2LMHeadModule: `transformer/{{wte,wpe,ln_f,h/i}}`, no `lm_head`: tied) -- no `model`
level, unlike ../flax-original. Per block: `ln_1`, `attn/{{c_attn,c_proj}}`, `ln_cross_attn`,
`crossattention/{{q_attn (32,32), c_attn (64,32), c_proj}}`, `ln_2`, `mlp/{{c_fc,c_proj}}`; GPT-2 Conv1D
kernels stored (out, in) as in the original. No `enc_to_dec_proj` (encoder and decoder widths equal).
"""
    (tf_dir / "README.md").write_text(text)


def versions_used():
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else importlib.import_module("jaxlib").__version__,
        "flax": flax.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "pillow": importlib.import_module("PIL").__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original-src", default=os.environ.get("VIT_GPT2_SRC"),
                    help=f"checkout of {ORIGINAL_REPO} at {ORIGINAL_COMMIT[:7]} (or set VIT_GPT2_SRC)")
    ap.add_argument("--ref-python", default=os.environ.get("VITGPT2_REF_PYTHON", str(ROOT / ".venv-ref/bin/python")),
                    help="python of the reference venv (transformers 4.57 + torch) for the PyTorch beam stage")
    ap.add_argument("--readme-only", action="store_true",
                    help="only rewrite the two README.md files from the fixtures' reference.json")
    args = ap.parse_args()
    if args.readme_only:
        write_readmes(OUT_ORIG, OUT_TF, json.loads((OUT_ORIG / "reference.json").read_text()),
                      json.loads((OUT_TF / "reference.json").read_text()))
        return 0
    if not args.original_src:
        ap.error(f"give --original-src: git clone {ORIGINAL_REPO} && git checkout {ORIGINAL_COMMIT[:7]}")
    src = Path(args.original_src)
    versions = versions_used()
    print("versions:", versions, flush=True)
    np.random.seed(0)
    torch.manual_seed(0)
    proc = image_processor()
    try:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            handoff = tmp / "handoff"
            ref_o, tens_o, b446_o, logprob_o = make_original(src, tmp, proc, versions, handoff)
            ref_t, tens_t, flax_beams, b446_t, logprob_t = make_transformers(tmp, proc, versions, handoff)
            torch_res = run_torch_stage(handoff, args.ref_python)
            print("== beams", flush=True)
            finalize_original(ref_o, torch_res["original"], b446_o, logprob_o)
            finalize_transformers(ref_t, torch_res["transformers"], flax_beams, b446_t, logprob_t)
            write_reference(tmp / "flax-original", ref_o, tens_o)
            write_reference(tmp / "flax-transformers", ref_t, tens_t)
            for d, header in [
                (tmp / "flax-original", "flax-original/flax_model.msgpack: the ViT meets GPT-2 project's tree"),
                (tmp / "flax-transformers", "flax-transformers/flax_model.msgpack: FlaxVisionEncoderDecoderModel"),
            ]:
                write_params_txt(d / "flax_model.msgpack", d / "params.txt", header)
            verify_saved(src, tmp, tmp / "flax-original", tmp / "flax-transformers", proc)
            write_readmes(tmp / "flax-original", tmp / "flax-transformers", ref_o, ref_t)
            for name in ["flax-original", "flax-transformers"]:
                dst = FIX / name
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(tmp / name, dst)
    except CheckFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nall {len(CHECKS)} checks passed")
    for name in ["flax-original", "flax-transformers"]:
        total = sum(p.stat().st_size for p in (FIX / name).iterdir())
        print(f"  tests/fixtures/{name}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
