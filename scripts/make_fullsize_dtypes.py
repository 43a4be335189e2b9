#!/usr/bin/env python3
"""Full-size ViT-GPT2 bundles in every transformers.js dtype, for the README's dtype table
(scripts/bench_dtypes.sh times them in the node and in onnxruntime).

    .venv-ref/bin/python scripts/make_fullsize_dtypes.py OUT_DIR [--dtypes q8,int8,uint8,fp16,q4]
        [--no-copy-q8] [--no-check] [--force]

Writes (nothing outside OUT_DIR; several GB, so not under the repository):

- OUT_DIR/checkpoint/: a seeded random full-size VisionEncoderDecoderModel saved by
  transformers (model.safetensors, ~1 GB), with
    encoder: ViTConfig() defaults = google/vit-base-patch16-224-in21k (224 px, patch 16, width 768,
             12 layers, 12 heads, MLP 3072, qkv bias);
    decoder: GPT2Config like asi/gpt-fr-cased-small (vocabulary 50,000, n_positions 1024, width
             768, 12 layers, 12 heads, add_cross_attention, <s>=0 <pad>=1 </s>=2);
             decoder_start_token_id 0.
  Weights are transformers' own random initialisation (torch seed 0): captions are not
  meaningful (greedy mostly repeats one token), and greedy margins are those of an untrained
  model (a few hundredths of a logit), so "same tokens as fp32" is a much stricter test here than
  on a trained model, and mostly decided by the first token.
  Tokenizer: byte-level BPE trained on the French sentences of scripts/make_fixtures.py (<s>=0
  <pad>=1 </s>=2 <unk>=3), its vocabulary padded to exactly 50,000 ids with unreachable
  concatenations of trained tokens (every id decodes to text; no merges lead to them).
  preprocessor_config.json: ViTImageProcessor as vit-base-patch16-224-in21k's (224x224, bilinear,
  rescale 1/255, do_normalize true, mean = std = 0.5), every field explicit.
  generation_config.json: max_length 20, num_beams 1, decoder_start 0, bos 0, eos 2, pad 1 (all
  fields written explicitly: save_pretrained drops defaults).
- OUT_DIR/optimum/: Optimum's DEFAULT export, `main_export(checkpoint,
  task="image-to-text-with-past")` (default post-processing and validation), configs and
  tokenizer files at the root (as Optimum wrote them, except generation_config.json, above),
  graphs in onnx/: encoder_model.onnx, decoder_model_merged.onnx, and Optimum's split
  decoder_model.onnx + decoder_with_past_model.onnx (kept so that the node can time split vs
  merged on the same weights), then the transformers.js dtype variants of encoder_model and
  decoder_model_merged, made by scripts/make_interop_fixtures.py's make_variant (transformers.js
  convert.py/quantize.py settings; see tests/fixtures/interop/README.md):
    *_quantized (q8), *_int8, *_uint8, *_fp16, *_q4.
  q8 uses the same ONNXQuantizer settings as uint8 for a graph with a Conv (the encoder) and as
  int8 otherwise (the decoder), so its files are byte copies of those (the interop fixtures check
  the byte identity); --no-copy-q8 quantizes them again instead.
- OUT_DIR/make_fullsize_dtypes.json: versions, settings, the seconds each step took (and the load
  average around it), every file's size and sha256, the op changes per variant, and the checks:
  onnxruntime fp32 greedy tokens (encoder + merged decoder, transformers.js's loop) = transformers'
  generate on one image, first-step logits difference, and every variant loading in onnxruntime
  and running one encoder pass + two decoder steps (both If branches).

Deterministic: seeds fixed, and the script re-executes itself with PYTHONHASHSEED=0 (which of two
duplicate lm_head initializer names survives Optimum's merge follows string hashing).
Exits 1 if a check fails. About 25-40 min on 2 idle cores; peak memory ~8 GB.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SUFFIX = {"fp32": "", "q8": "_quantized", "int8": "_int8", "uint8": "_uint8", "fp16": "_fp16", "q4": "_q4"}
VARIANT_ORDER = ["int8", "uint8", "q8", "fp16", "q4"]  # q8 after int8/uint8: it may copy them
BASES = ["encoder_model", "decoder_model_merged"]
ROOT_FILES = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt"]
VOCAB = 50_000
MAX_LENGTH = 20
SEED = 0


def sha256(path, bufsize=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def versions():
    v = {"python": sys.version.split()[0]}
    for n in ["torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers",
              "numpy", "pillow", "safetensors"]:
        try:
            v[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            v[n] = None
    return v


class Steps:
    """Wall-clock seconds per step, with the 1-minute load average before and after."""

    def __init__(self):
        self.rows = []
        self.t0 = time.perf_counter()

    def run(self, name, fn, *a, **kw):
        la0 = os.getloadavg()[0]
        t = time.perf_counter()
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {name} …", flush=True)
        out = fn(*a, **kw)
        dt = time.perf_counter() - t
        self.rows.append({"step": name, "seconds": round(dt, 2), "load1_before": round(la0, 2),
                          "load1_after": round(os.getloadavg()[0], 2)})
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {name}: {dt:.1f} s (load {la0:.2f} → {os.getloadavg()[0]:.2f})",
              flush=True)
        return out

    def total(self):
        return round(time.perf_counter() - self.t0, 1)


# ------------------------------------------------------------------------------ checkpoint

def make_tokenizer(dst: Path):
    """Byte-level BPE trained on a few French sentences, padded to exactly VOCAB ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    from make_fixtures import FRENCH

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(FRENCH * 3, trainer=trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    trained = len(vocab)
    pieces = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i >= 4]
    rng = random.Random(SEED)
    next_id = max(vocab.values()) + 1
    while next_id < VOCAB:
        s = rng.choice(pieces) + rng.choice(pieces)
        if s not in vocab:
            vocab[s] = next_id
            next_id += 1
    tok = Tokenizer.from_str(json.dumps(j))
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>")
    assert len(fast) == VOCAB and fast.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    fast.save_pretrained(str(dst))
    return {"trained_ids": trained, "padded_to": VOCAB,
            "padding": "unreachable concatenations of two trained tokens (random.Random(0))"}


def generation_config_dict():
    import transformers
    return {"decoder_start_token_id": 0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "max_length": MAX_LENGTH, "min_length": 0, "num_beams": 1, "length_penalty": 1.0,
            "early_stopping": False, "no_repeat_ngram_size": 0,
            "transformers_version": transformers.__version__}


def make_checkpoint(dst: Path, layers: int = 12):
    import torch
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    dst.mkdir(parents=True, exist_ok=True)
    tok_info = make_tokenizer(dst)
    enc = ViTConfig()  # = google/vit-base-patch16-224-in21k
    assert (enc.image_size, enc.patch_size, enc.hidden_size, enc.num_hidden_layers) == (224, 16, 768, 12)
    enc.num_hidden_layers = layers  # 12 unless --layers (smoke tests of this script)
    dec = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=768, n_layer=layers, n_head=12,
                     add_cross_attention=True, bos_token_id=0, eos_token_id=2, pad_token_id=1, is_decoder=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 0
    cfg.pad_token_id = 1
    cfg.eos_token_id = 2
    cfg.bos_token_id = 0
    random.seed(SEED)
    torch.manual_seed(SEED)
    import numpy as np
    np.random.seed(SEED)
    model = VisionEncoderDecoderModel(cfg).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    with open(dst / "generation_config.json", "w") as f:
        json.dump(generation_config_dict(), f, indent=2)
    proc = ViTImageProcessor(do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5])
    proc.save_pretrained(str(dst))
    pj = json.load(open(dst / "preprocessor_config.json"))
    assert pj["do_normalize"] is True
    n_params = sum(p.numel() for p in model.parameters())
    return model, {"parameters": n_params, "tokenizer": tok_info}


# ---------------------------------------------------------------------------------- export

def export_optimum(ckpt: Path, bundle: Path):
    from optimum.exporters.onnx import main_export

    tmp = bundle.parent / ".optimum-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    main_export(str(ckpt), output=str(tmp), task="image-to-text-with-past")
    written = sorted(p.name for p in tmp.iterdir())
    assert (tmp / "decoder_model_merged.onnx").exists(), f"Optimum did not write a merged decoder: {written}"
    (bundle / "onnx").mkdir(parents=True, exist_ok=True)
    for f in ROOT_FILES:
        if (tmp / f).exists():
            shutil.move(str(tmp / f), str(bundle / f))
    # save_pretrained drops defaults: the explicit generation config replaces Optimum's.
    shutil.copy(ckpt / "generation_config.json", bundle / "generation_config.json")
    moved = []
    for p in sorted(tmp.iterdir()):
        if p.name.endswith(".onnx") or "onnx_data" in p.name or p.name.endswith(".data"):
            shutil.move(str(p), str(bundle / "onnx" / p.name))
            moved.append(p.name)
    leftover = sorted(p.name for p in tmp.iterdir())
    shutil.rmtree(tmp)
    return {"optimum_wrote": written, "graphs_moved_to_onnx": moved, "replaced_or_not_kept": leftover,
            "external_data_files": [m for m in moved if not m.endswith(".onnx")]}


# -------------------------------------------------------------------------------- variants

def op_counts(model):
    import make_interop_fixtures as mif
    return mif.all_ops(model)


def make_variants(bundle: Path, dtypes, copy_q8: bool, steps: Steps):
    import onnx

    import make_interop_fixtures as mif

    onnx_dir = bundle / "onnx"
    info = {}
    fp32_ops = {}
    for base in BASES:
        m = steps.run(f"count ops {base}", onnx.load, str(onnx_dir / f"{base}.onnx"))
        fp32_ops[base] = op_counts(m)
        del m
    for dtype in [d for d in VARIANT_ORDER if d in dtypes]:
        for base in BASES:
            dst = onnx_dir / f"{base}{SUFFIX[dtype]}.onnx"
            if dtype == "q8" and copy_q8:
                ops = set(fp32_ops[base])
                same = "uint8" if ops & {"Conv", "GroupQueryAttention", "MultiHeadAttention"} else "int8"
                src = onnx_dir / f"{base}{SUFFIX[same]}.onnx"
                if src.exists():
                    steps.run(f"{dtype} {base} (copy of {same})", shutil.copy, src, dst)
                    info[f"{dtype}/{base}"] = {**info[f"{same}/{base}"], "how": f"byte copy of {src.name}: q8 = "
                                               f"{same} settings for this graph (transformers.js quantize.py)"}
                    continue
            m, how = steps.run(f"{dtype} {base}", mif.make_variant, onnx_dir / f"{base}.onnx", dtype)
            ops = op_counts(m)
            steps.run(f"save {dst.name}", onnx.save, m, str(dst))
            del m
            delta = {k: ops[k] - fp32_ops[base][k] for k in sorted(set(ops) | set(fp32_ops[base]))
                     if ops[k] != fp32_ops[base][k]}
            info[f"{dtype}/{base}"] = {"how": how, "op_count_change_vs_fp32": delta}
    return info


# ---------------------------------------------------------------------------------- checks

def checks(bundle: Path, model, dtypes, steps: Steps):
    """fp32: onnxruntime greedy (merged decoder) = transformers' generate on one image, first-step
    logits close. Every variant: loads in onnxruntime, runs the encoder and both If branches."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTImageProcessor

    import make_interop_fixtures as mif

    mif.MAX_LENGTH = MAX_LENGTH
    img_path = HERE.parent / "tests" / "fixtures" / "images" / "street.jpg"
    proc = ViTImageProcessor.from_pretrained(str(bundle))
    pv = proc(images=Image.open(img_path).convert("RGB"), return_tensors="pt").pixel_values
    out = {"image": str(img_path.relative_to(HERE.parent)), "ort": {}}
    problems = []

    def reference():
        with torch.no_grad():
            g = model.generate(pixel_values=pv, max_length=MAX_LENGTH, num_beams=1, do_sample=False,
                               decoder_start_token_id=0, eos_token_id=2, pad_token_id=1,
                               output_scores=True, return_dict_in_generate=True)
            first = model(pixel_values=pv, decoder_input_ids=torch.tensor([[0]])).logits[0, -1].numpy()
        return g, first

    g, first_torch = steps.run("transformers reference (generate, first-step logits)", reference)
    torch_tokens = mif.strip_generated(g.sequences[0].tolist())
    torch_margin = min(mif.margin_of(s[0].float().numpy()) for s in g.scores)
    out["transformers_greedy"] = {"tokens": torch_tokens, "min_margin": torch_margin}
    for dtype in ["fp32"] + [d for d in VARIANT_ORDER if d in dtypes]:
        e = bundle / "onnx" / f"encoder_model{SUFFIX[dtype]}.onnx"
        d = bundle / "onnx" / f"decoder_model_merged{SUFFIX[dtype]}.onnx"

        def run():
            t = time.perf_counter()
            enc, dec = mif.session(str(e)), mif.session(str(d))
            load_s = time.perf_counter() - t
            if dtype == "fp32":
                ids, margins, first, _ = mif.ort_greedy_merged(enc, dec, pv.numpy())
            else:  # one encoder pass, then both branches (steps 0 and 1)
                mif_max, mif.MAX_LENGTH = mif.MAX_LENGTH, 3
                try:
                    ids, margins, first, _ = mif.ort_greedy_merged(enc, dec, pv.numpy())
                finally:
                    mif.MAX_LENGTH = mif_max
            return load_s, ids, margins, first

        try:
            load_s, ids, margins, first = steps.run(f"onnxruntime check {dtype}", run)
        except Exception as ex:  # noqa: BLE001 - recorded, makes the script exit 1
            problems.append(f"{dtype}: onnxruntime: {type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
            out["ort"][dtype] = {"error": problems[-1]}
            continue
        r = {"session_load_s": round(load_s, 2), "tokens": ids, "min_margin": min(margins),
             "first_step_logits_max_abs_diff_vs_transformers": float(np.abs(first - first_torch).max())}
        out["ort"][dtype] = r
        if dtype == "fp32":
            if ids != torch_tokens:
                problems.append(f"fp32: onnxruntime greedy {ids} != transformers {torch_tokens}")
            if r["first_step_logits_max_abs_diff_vs_transformers"] > 1e-3:
                problems.append(f"fp32: first-step logits differ by {r['first_step_logits_max_abs_diff_vs_transformers']}")
    return out, problems


# ------------------------------------------------------------------------------------ main

def files_table(bundle: Path, hashes: bool):
    rows = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            rows[str(p.relative_to(bundle))] = {"bytes": p.stat().st_size, **({"sha256": sha256(p)} if hashes else {})}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtypes", default="q8,int8,uint8,fp16,q4", help="variants to make (fp32 is always exported)")
    ap.add_argument("--no-copy-q8", action="store_true", help="quantize q8 again instead of copying int8/uint8")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime/transformers checks")
    ap.add_argument("--no-sha", action="store_true", help="skip sha256 of the files")
    ap.add_argument("--force", action="store_true", help="remove OUT_DIR/checkpoint and OUT_DIR/optimum first")
    ap.add_argument("--layers", type=int, default=12, help="encoder and decoder layers (not 12: only to smoke-test this script)")
    a = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    dtypes = [d for d in a.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in SUFFIX or d == "fp32"]
    if bad:
        ap.error(f"unknown dtype(s) {bad}: choose from {[d for d in SUFFIX if d != 'fp32']}")
    out = a.out_dir.resolve()
    ckpt, bundle = out / "checkpoint", out / "optimum"
    for d in (ckpt, bundle):
        if d.exists():
            if not a.force:
                sys.exit(f"{d} exists: pass --force to rebuild it")
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    report = {"generator": "scripts/make_fullsize_dtypes.py", "argv": sys.argv[1:], "versions": versions(),
              "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}

    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    model, report["model"] = steps.run("checkpoint (random full-size model + tokenizer)", make_checkpoint, ckpt, a.layers)
    report["export"] = steps.run("optimum main_export (default, image-to-text-with-past)", export_optimum, ckpt, bundle)
    report["variants"] = make_variants(bundle, dtypes, not a.no_copy_q8, steps)
    problems = []
    if not a.no_check:
        report["checks"], problems = checks(bundle, model, dtypes, steps)
    report["files"] = steps.run("sizes and sha256", files_table, bundle, not a.no_sha)
    report["steps"] = steps.rows
    report["total_seconds"] = steps.total()
    report["load_avg_end"] = os.getloadavg()
    report["problems"] = problems
    with open(out / "make_fullsize_dtypes.json", "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"\n{'file':48s} {'MB':>9s}")
    for k, v in report["files"].items():
        if k.endswith(".onnx") or "data" in k:
            print(f"{k:48s} {v['bytes'] / 1e6:9.1f}")
    print(f"total {report['total_seconds']:.0f} s; report: {out / 'make_fullsize_dtypes.json'}")
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("all checks passed" if not a.no_check else "checks skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
