#!/usr/bin/env python3
"""Reference fixtures for the candle host model (tests/candle_model.rs), made with transformers.

Writes tests/fixtures/candle/:
  vit/     a tiny pretrained-style ViT (ViTModel.save_pretrained: config.json, model.safetensors,
           preprocessor_config.json)
  gpt2/    a tiny GPT-2 LM (GPT2LMHeadModel) shipped like asi/gpt-fr-cased-small: config.json and
           pytorch_model.bin only (torch zip pickle), with the old `attn.bias`/`attn.masked_bias`
           buffers that checkpoints of that era carry, plus the fixture tokenizer
  ved/     VisionEncoderDecoderModel.from_encoder_decoder_pretrained(vit, gpt2) saved with
           save_pretrained (model.safetensors). Encoder width 24 != decoder width 32, so it has
           `enc_to_dec_proj`. Its cross-attention weights are random (that is the recipe).
  reference.safetensors   inputs and transformers' outputs on a fixed batch:
           pixel_values [2,3,32,32], labels [2,7] (-100 = padding), decoder_input_ids [2,7]
           (labels shifted right with decoder_start_token_id, -100 -> pad), encoder_hidden
           [2,17,32] (after enc_to_dec_proj), logits [2,7,V] (full teacher-forced pass),
           logits_cached [2,7,V] (one token at a time with past_key_values), logits_scaled
           [2,7,V] (same weights, decoder scale_attn_by_inverse_layer_idx and
           reorder_and_upcast_attn on, eager attention), loss [] and grad.<name> for every
           parameter that gets a gradient (eval mode: dropout off, so deterministic).
  reference.json          the list of tensors that transformers initialised when building ved/
                          from the parts, and the numbers printed below.

Every weight is redrawn with a larger spread than GPT-2's 0.02 (biases and layer norms
included) so that logits are O(1..10) and a wrong tensor cannot hide.

Loss: transformers 4.57's VisionEncoderDecoderModel computes `outputs.loss` with ForCausalLMLoss,
which shifts the (already right-shifted) labels a second time (transformers issue #40111, fixed
by PR #40863). The reference loss is the intended one, cross-entropy of logits[t] against
labels[t] with -100 ignored; both numbers are printed.

Attention: the default (sdpa) GPT-2 attention of transformers 4.57 ignores
scale_attn_by_inverse_layer_idx; logits_scaled is computed with attn_implementation="eager",
which implements GPT-2's definition. The script prints how much sdpa differs.

Run from the repository root (seeds fixed, same bytes every run):
    .venv-ref/bin/python scripts/make_candle_fixtures.py
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "candle"
TOK_SRC = ROOT / "tests" / "fixtures" / "tiny-vit-gpt2"
SEED = 7
VOCAB = 420  # the fixture tokenizer's
START, PAD, EOS = 0, 1, 2


def redraw(module: torch.nn.Module, gen: torch.Generator):
    """Every parameter redrawn: matrices N(0, 0.3), biases N(0, 0.1), layer-norm gains 1 + N(0, 0.1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name or ".ln_" in name or name.startswith("ln_") or "ln_f" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)


def make_vit(gen):
    cfg = ViTConfig(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_channels=3,
        qkv_bias=True,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = ViTModel(cfg)  # with pooler, as google/vit-base-patch16-224-in21k
    redraw(model, gen)
    d = OUT / "vit"
    model.save_pretrained(str(d), safe_serialization=True)
    shutil.copy(TOK_SRC / "preprocessor_config.json", d / "preprocessor_config.json")


def make_gpt2(gen):
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=START,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(cfg)
    redraw(model, gen)
    d = OUT / "gpt2"
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(d))
    # As a 2020 checkpoint: the tied lm_head.weight stored too, and the causal-mask buffers.
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    n = cfg.n_positions
    for i in range(cfg.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones((n, n), dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, d / "pytorch_model.bin")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]:
        shutil.copy(TOK_SRC / name, d / name)


def ved_from_parts(gen):
    model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(str(OUT / "vit"), str(OUT / "gpt2"))
    model.config.decoder_start_token_id = START
    model.config.pad_token_id = PAD
    model.config.eos_token_id = EOS
    vit_keys = set(ViTModel.from_pretrained(str(OUT / "vit")).state_dict().keys())
    gpt_keys = set(GPT2LMHeadModel.from_pretrained(str(OUT / "gpt2")).state_dict().keys())
    initialised = sorted(
        k for k in model.state_dict().keys()
        if not (k.startswith("encoder.") and k[len("encoder."):] in vit_keys)
        and not (k.startswith("decoder.") and k[len("decoder."):] in gpt_keys)
    )
    # The new tensors start at GPT-2's initialisation (tiny); redraw them like the rest so the
    # reference exercises them. The pretrained parts stay as they are.
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k in initialised:
            p = params[k]
            noise = torch.randn(p.shape, generator=gen)
            if "ln_cross_attn" in k:
                p.copy_((1.0 if k.endswith("weight") else 0.0) + 0.1 * noise)
            elif k.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    model.eval()
    d = OUT / "ved"
    model.save_pretrained(str(d), safe_serialization=True)
    # Local paths have no place in a committed config.
    cfg = json.load(open(d / "config.json"))
    for part in ("encoder", "decoder"):
        cfg[part].pop("_name_or_path", None)
    json.dump(cfg, open(d / "config.json", "w"), indent=2, sort_keys=True)
    gen_cfg = {
        "decoder_start_token_id": START, "bos_token_id": START, "eos_token_id": EOS, "pad_token_id": PAD,
        "max_length": 12, "min_length": 0, "num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
        "no_repeat_ngram_size": 0, "transformers_version": transformers.__version__,
    }
    json.dump(gen_cfg, open(d / "generation_config.json", "w"), indent=2)
    for name in ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(TOK_SRC / name, d / name)
    return model, initialised


def shift_right(labels):
    ids = torch.full_like(labels, START)
    ids[:, 1:] = labels[:, :-1]
    return ids.masked_fill(ids == -100, PAD)


def main():
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    make_vit(gen)
    make_gpt2(gen)
    model, initialised = ved_from_parts(gen)
    assert hasattr(model, "enc_to_dec_proj")

    pixel_values = torch.randn((2, 3, 32, 32), generator=gen)
    labels = torch.tensor([[17, 250, 33, 301, 98, 7, EOS], [44, 380, 5, EOS, -100, -100, -100]])
    decoder_input_ids = shift_right(labels)

    # Full teacher-forced pass, loss and gradients (eval: dropout off).
    model.zero_grad()
    out = model(pixel_values=pixel_values, labels=labels)
    logits = out.logits
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    no_grad = sorted(k for k, p in model.named_parameters() if p.grad is None)

    with torch.no_grad():
        enc = model.encoder(pixel_values=pixel_values).last_hidden_state
        encoder_hidden = model.enc_to_dec_proj(enc)
        # Cached incremental decoding: one token per call, keys/values from past_key_values.
        past = None
        steps = []
        for t in range(decoder_input_ids.shape[1]):
            o = model(
                encoder_outputs=(enc,),
                decoder_input_ids=decoder_input_ids[:, t : t + 1],
                past_key_values=past,
                use_cache=True,
            )
            past = o.past_key_values
            steps.append(o.logits[:, -1])
        logits_cached = torch.stack(steps, dim=1)

        # Same weights, GPT-2's optional attention scalings on (eager attention).
        scaled = {}
        for impl in ["eager", "sdpa"]:
            cfg = model.config.__class__.from_dict(model.config.to_dict())
            cfg.decoder.scale_attn_by_inverse_layer_idx = True
            cfg.decoder.reorder_and_upcast_attn = True
            m2 = VisionEncoderDecoderModel(cfg)
            m2.config._attn_implementation = impl
            m2.decoder.config._attn_implementation = impl
            m2.encoder.config._attn_implementation = impl
            m2.load_state_dict(model.state_dict())
            m2.eval()
            scaled[impl] = m2(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits

    tensors = {
        "pixel_values": pixel_values,
        "labels": labels.to(torch.int64),
        "decoder_input_ids": decoder_input_ids.to(torch.int64),
        "encoder_hidden": encoder_hidden,
        "logits": logits.detach(),
        "logits_cached": logits_cached,
        "logits_scaled": scaled["eager"],
        "loss": loss.detach().reshape(()),
        **grads,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"), metadata={"format": "pt"})

    info = {
        "generator": "scripts/make_candle_fixtures.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "initialised_from_parts": initialised,
        "no_gradient": no_grad,
        "loss": float(loss.detach()),
        "transformers_outputs_loss_double_shifted": float(out.loss),
        "cached_vs_full_max_abs_diff": float((logits_cached - logits.detach()).abs().max()),
        "logits_max_abs": float(logits.detach().abs().max()),
        "scaled_sdpa_vs_eager_max_abs_diff": float((scaled["sdpa"] - scaled["eager"]).abs().max()),
        "scaled_vs_unscaled_max_abs_diff": float((scaled["eager"] - logits.detach()).abs().max()),
    }
    json.dump(info, open(OUT / "reference.json", "w"), indent=1)
    assert info["cached_vs_full_max_abs_diff"] < 1e-4
    for k, v in info.items():
        if k not in ("initialised_from_parts", "no_gradient"):
            print(f"{k}: {v}")
    print("initialised from parts:", initialised)
    print("no gradient:", no_grad)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
