#!/usr/bin/env python3
"""A checkpoint written by vitgpt2 (`vitgpt2-host convert`, `train`) in transformers itself.

    VITGPT2_PYTHON=.venv-ref/bin/python cargo test --features host ...   (the Rust tests run it)
    python scripts/check_transformers_load.py CKPT CANDLE.safetensors IMAGE

CANDLE.safetensors is written by the Rust test (tests/common/mod.rs, `check_in_transformers`):
`pixel_values` [1,3,H,W] (vitgpt2's preprocessing of IMAGE), `decoder_input_ids` [1,T] (the
decoder start + candle's greedy ids), `logits` [1,T,V] (candle's full forward on them) and `greedy`
[n] (candle's greedy ids, up to and including </s>). Checks, each printed:

1. `VisionEncoderDecoderModel.from_pretrained(CKPT)`: no missing, unexpected or mismatched keys,
   the LM head tied to the token embedding.
2. The tokenizer both ways: from tokenizer.json and from vocab.json + merges.txt alone
   (`GPT2Tokenizer`, the slow one in transformers 4.x, and `AutoTokenizer`) the same ids and
   special tokens; `GenerationConfig` loads;
   `AutoImageProcessor` gives vitgpt2's pixel values for IMAGE (a PNG: within 1e-6).
3. Logits within 1e-4 of candle's. When config.json sets `decoder.cross_attention_causal` (the
   original ViT-GPT2; transformers ignores the setting), the decoder is given the equivalent mask,
   `encoder_attention_mask = ones(T, S).tril()` (eager attention): caption position t sees image
   tokens 0..t. What transformers gives without it is printed too (it must differ).
4. Greedy decoding gives candle's ids: `generate()`, or with the causal mask a loop over the full
   forward (transformers' generate cannot grow a [T, S] mask step by step).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import transformers
from transformers import (AutoImageProcessor, AutoTokenizer, GenerationConfig, GPT2Tokenizer,
                          VisionEncoderDecoderModel)
from transformers.image_utils import load_image

LOGITS_TOL = 1e-4  # float32 on both sides, other summation orders: measured ~1e-5
PIXEL_TOL = 1e-6  # PNG: vitgpt2's resize is PIL's bit for bit
TEXT = "Une photo d'un chat noir assis sur un canapé, à côté d'une tasse."


def check(ok, what):
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        raise SystemExit(f"check failed: {what}")


def main(ckpt, candle_file, image):
    ckpt = Path(ckpt)
    rec = load_file(candle_file)
    cfg = json.loads((ckpt / "config.json").read_text())
    causal = bool(cfg["decoder"].get("cross_attention_causal", False))
    print(f"{ckpt}: transformers {transformers.__version__}, torch {torch.__version__}; "
          f"decoder.cross_attention_causal = {causal}")

    model, info = VisionEncoderDecoderModel.from_pretrained(str(ckpt), output_loading_info=True,
                                                            attn_implementation="eager")
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    check(not problems, f"loads with no missing/unexpected/mismatched keys ({problems or 'all empty'})")
    check(model.decoder.lm_head.weight.data_ptr() == model.decoder.transformer.wte.weight.data_ptr(),
          "lm_head tied to wte")

    # The tokenizer from tokenizer.json, and from vocab.json + merges.txt alone (a folder without
    # tokenizer.json: transformers 4.x's slow GPT2Tokenizer, and what AutoTokenizer converts).
    fast = AutoTokenizer.from_pretrained(str(ckpt))
    with tempfile.TemporaryDirectory() as only_bpe:
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(ckpt / f, only_bpe)
        others = [GPT2Tokenizer.from_pretrained(only_bpe), AutoTokenizer.from_pretrained(only_bpe)]
    ids = fast(TEXT)["input_ids"]
    names = ", ".join(type(t).__name__ for t in [fast] + others)
    check(all(t(TEXT)["input_ids"] == ids for t in others),
          f"tokenizer.json and vocab.json + merges.txt give the same {len(ids)} ids on a French sentence ({names})")
    specials = ["bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"]
    want = [getattr(fast, s) for s in specials]
    check(all([getattr(t, s) for s in specials] == want for t in others), f"special ids {want} (bos, eos, pad, unk) in every form")
    gen = GenerationConfig.from_pretrained(str(ckpt))
    check(gen.eos_token_id in (fast.eos_token_id, [fast.eos_token_id]),
          f"generation_config.json loads (num_beams {gen.num_beams}, max_length {gen.max_length}, eos {gen.eos_token_id})")
    processor = AutoImageProcessor.from_pretrained(str(ckpt))
    pv = processor(load_image(str(image)), return_tensors="pt").pixel_values
    d = float((pv - rec["pixel_values"]).abs().max())
    check(d <= PIXEL_TOL, f"{type(processor).__name__} pixel values: max |transformers - vitgpt2| = {d:.2e}")

    pixel_values, ids = rec["pixel_values"], rec["decoder_input_ids"]

    def forward(ids, masked):
        with torch.no_grad():
            enc = model.encoder(pixel_values=pixel_values).last_hidden_state
            if getattr(model, "enc_to_dec_proj", None) is not None:
                enc = model.enc_to_dec_proj(enc)
            mask = None
            if masked:
                # 1 where caption position t may see image token j (j <= t). transformers 4.x takes
                # it as a 3-D 0/1 mask; 5.x takes a ready 4-D additive one as is.
                mask = torch.ones(ids.shape[0], ids.shape[1], enc.shape[1]).tril()
                if int(transformers.__version__.split(".")[0]) >= 5:
                    mask = ((1.0 - mask) * torch.finfo(enc.dtype).min)[:, None]
            return model.decoder(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=mask).logits

    logits = forward(ids, causal)
    d = float((logits - rec["logits"]).abs().max())
    how = "with the causal cross-attention mask" if causal else "as transformers runs it"
    check(d <= LOGITS_TOL, f"logits {tuple(logits.shape)} {how}: max |transformers - candle| = {d:.2e}")
    if causal:
        plain = float((forward(ids, False) - rec["logits"]).abs().max())
        check(plain > 1.0, f"without the mask (what transformers alone runs) the logits differ by {plain:.2f}")

    eos, start = gen.eos_token_id, int(ids[0, 0])
    want = rec["greedy"].tolist()
    # <s> + candle's ids: its max_length when it did not stop at </s>.
    max_length = ids.shape[1]
    if causal:
        seq = torch.tensor([[start]])
        while seq.shape[1] < max_length:
            nxt = int(forward(seq, True)[0, -1].argmax())
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            if nxt == eos:
                break
        got = seq[0, 1:].tolist()
    else:
        with torch.no_grad():
            out = model.generate(pixel_values, max_length=max_length, num_beams=1, do_sample=False,
                                 min_length=0, no_repeat_ngram_size=0, decoder_start_token_id=start)
        got = out[0, 1:].tolist()
        if eos in got:
            got = got[: got.index(eos) + 1]
    check(got == want, f"greedy ids equal candle's ({len(want)} ids{', full-forward loop with the mask' if causal else ', generate()'})")
    print("OK")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
