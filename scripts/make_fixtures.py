#!/usr/bin/env python3
"""Deterministic test fixtures for vitgpt2, made with the reference implementation.

Builds a tiny random ViT-GPT2 (VisionEncoderDecoderModel: ViT encoder + GPT-2 decoder with
cross-attention) with a byte-level BPE tokenizer trained on French sentences (<s>=0, <pad>=1,
</s>=2, <unk>=3 like asi/gpt-fr-cased-small), exports it with Optimum (image-to-text-with-past),
quantizes an int8 copy with onnxruntime, draws test images of several sizes and colour types,
and records what transformers says about them in tests/fixtures/reference.json.

Run from the repository root with the reference venv (see README, "Reference fixtures"):
    .venv-ref/bin/python scripts/make_fixtures.py
Re-running produces the same reference outputs (seeds fixed); ONNX protobufs may differ in
metadata only.
"""
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import transformers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2TokenizerFast,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)
from transformers.image_utils import load_image

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
BUNDLE = FIX / "tiny-vit-gpt2"
SPLIT_TOK = FIX / "tiny-vit-gpt2-vocab-merges"  # tokenizer as vocab.json + merges.txt only
IMAGES = FIX / "images"

SEED = 4  # chosen for large greedy margins and some captions ending in </s>
IMAGE_SIZE = 32
MAX_LENGTH = 20

FRENCH = [
    "Un chat noir dort sur un canapé rouge.",
    "Deux chiens jouent dans l'herbe verte près d'un arbre.",
    "Une femme tient un parapluie bleu sous la pluie.",
    "Un homme fait du vélo dans une rue animée.",
    "Une assiette de légumes et de riz sur une table en bois.",
    "Un train jaune arrive à la gare.",
    "Des enfants mangent une pizza dans une cuisine.",
    "Un avion blanc vole au-dessus des nuages.",
    "Un bus rouge est garé à côté d'un bâtiment.",
    "Une girafe mange les feuilles d'un grand arbre.",
    "Un bateau navigue sur un lac calme au coucher du soleil.",
    "Trois moutons se tiennent dans un champ.",
    "Une petite fille joue avec un cerf-volant sur la plage.",
    "Un ordinateur portable est posé sur un bureau encombré.",
    "Un cheval brun galope dans une prairie.",
    "Une tour d'horloge se dresse au centre de la ville.",
    "Des gens marchent sur un trottoir enneigé.",
    "Un skieur descend une pente raide.",
    "Un éléphant se baigne dans une rivière boueuse.",
    "Une voiture verte est arrêtée au feu rouge.",
    "Un garçon lance un frisbee à son chien.",
    "Un gâteau d'anniversaire avec des bougies allumées.",
    "Deux triangles verts à droite d'un grand cercle rouge.",
    "Un carré bleu au-dessus de trois petits cercles jaunes.",
    "Une moto noire est garée devant un café.",
    "Un zèbre et une girafe dans un enclos.",
    "Un homme âgé lit le journal sur un banc.",
    "Une salle de bain avec un lavabo blanc et un miroir.",
    "Un oiseau est perché sur une branche.",
    "Des fruits frais sont exposés au marché.",
]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(out_dir: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(FRENCH * 3, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    fast = GPT2TokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(vocab_size: int) -> VisionEncoderDecoderModel:
    enc = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        qkv_bias=True,
    )
    dec = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        add_cross_attention=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        is_decoder=True,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 0
    cfg.pad_token_id = 1
    cfg.eos_token_id = 2
    cfg.bos_token_id = 0
    model = VisionEncoderDecoderModel(cfg)
    # A random tiny decoder tends to repeat one token forever. Sharpen the decoder's own layers
    # (not the tied embedding) so that captions vary with the image and greedy margins are large.
    with torch.no_grad():
        for block in model.decoder.transformer.h:
            block.crossattention.c_proj.weight.mul_(6.0)
            block.crossattention.c_attn.weight.mul_(3.0)
            block.crossattention.q_attn.weight.mul_(3.0)
            block.mlp.c_proj.weight.mul_(3.0)
            block.attn.c_proj.weight.mul_(3.0)
        model.decoder.transformer.wpe.weight.mul_(4.0)
        # Large logits (sharp final layernorm gain) make greedy margins robust to float noise;
        # shrinking the byte tokens favours word pieces, and a stronger </s> ends some captions.
        model.decoder.transformer.ln_f.weight.mul_(100.0)
        model.decoder.transformer.wte.weight[4:260].mul_(0.2)
        model.decoder.transformer.wte.weight[2].mul_(1.1)
    model.eval()
    return model


def generation_config() -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        max_length=MAX_LENGTH,
        num_beams=1,
    )


def write_generation_config(path: Path):
    # save_pretrained drops fields equal to their defaults: write them all explicitly.
    json.dump(
        {
            "decoder_start_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "max_length": MAX_LENGTH,
            "min_length": 0,
            "num_beams": 1,
            "length_penalty": 1.0,
            "early_stopping": False,
            "no_repeat_ngram_size": 0,
            "transformers_version": transformers.__version__,
        },
        open(path, "w"),
        indent=2,
    )


def draw_scene(w, h, seed, mode="RGB"):
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(4, max(5, w // 2)), y0 + rng.randrange(4, max(5, h // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            d.rectangle([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.RandomState(seed).randint(-12, 13, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def make_images():
    IMAGES.mkdir(parents=True, exist_ok=True)
    files = []

    def save(name, img, **kw):
        img.save(IMAGES / name, **kw)
        files.append(name)

    save("street.jpg", draw_scene(320, 240, 1), quality=90)
    save("garden_444.jpg", draw_scene(97, 131, 2), quality=95, subsampling=0)
    # Portrait stored sideways with EXIF Orientation=6 (rotate 90° clockwise to display).
    exif = Image.Exif()
    exif[0x0112] = 6
    save("portrait_exif6.jpg", draw_scene(200, 120, 3), quality=90, exif=exif.tobytes())
    rgba = draw_scene(64, 48, 4).convert("RGBA")
    alpha = Image.linear_gradient("L").resize((64, 48))
    rgba.putalpha(alpha)
    save("rgba.png", rgba)
    save("gray.png", draw_scene(50, 70, 5).convert("L"))
    save("gray_alpha.png", draw_scene(40, 30, 6).convert("LA"))
    save("palette.png", draw_scene(33, 17, 7).convert("P", palette=Image.ADAPTIVE, colors=16))
    # 16-bit grayscale: PIL opens it as mode I;16 and convert('RGB') clips values above 255.
    g16 = (np.asarray(draw_scene(40, 40, 8).convert("L")).astype(np.uint16) * 4).astype(np.uint16)
    save("gray16.png", Image.fromarray(g16))  # uint16 array -> mode I;16
    save("tiny.bmp", draw_scene(7, 5, 9))
    save("wide.webp", draw_scene(180, 40, 10), lossless=True)

    # Bad inputs: a truncated JPEG and a text file with an image extension.
    data = (IMAGES / "street.jpg").read_bytes()
    (IMAGES / "bad_truncated.jpg").write_bytes(data[: len(data) // 3])
    (IMAGES / "bad_not_an_image.png").write_text("this is not an image\n")
    return files


def onnx_export(model_dir: Path):
    from optimum.exporters.onnx import main_export

    tmp = model_dir / "_onnx_tmp"
    main_export(str(model_dir), output=str(tmp), task="image-to-text-with-past", no_post_process=True)
    for name in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]:
        shutil.move(str(tmp / name), str(model_dir / name))
    shutil.rmtree(tmp)


def gemm_to_matmul(path_in: Path, path_out: Path):
    """quantize_dynamic skips Gemm, and GPT-2's Conv1D exports as Gemm: rewrite it first."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path_in))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 \
                and not attrs.get("transA", 0):
            w = n.input[1]
            if attrs.get("transB", 0):
                t = numpy_helper.to_array(inits[w]).T.copy()
                inits[w].CopyFrom(numpy_helper.from_array(t, w))
            mm_out = n.output[0] + "_mm" if len(n.input) > 2 else n.output[0]
            new_nodes.append(helper.make_node("MatMul", [n.input[0], w], [mm_out], name=n.name + "_mm"))
            if len(n.input) > 2:
                new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_add"))
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.save(m, str(path_out))


def quantize(model_dir: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = model_dir / "onnx"
    out.mkdir(exist_ok=True)
    for name in ["encoder_model", "decoder_model", "decoder_with_past_model"]:
        tmp = out / f"{name}_matmul.onnx"
        gemm_to_matmul(model_dir / f"{name}.onnx", tmp)
        quantize_dynamic(str(tmp), str(out / f"{name}_quantized.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True)
        tmp.unlink()


def ort_greedy(model_dir: Path, suffix: str, pixel_values: np.ndarray, n_layer: int):
    """A plain greedy loop over the exported ONNX graphs in onnxruntime."""
    import onnxruntime as ort

    sub = model_dir / "onnx" if suffix else model_dir
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    enc = ort.InferenceSession(str(sub / f"encoder_model{suffix}.onnx"), opts)
    dec = ort.InferenceSession(str(sub / f"decoder_model{suffix}.onnx"), opts)
    dwp = ort.InferenceSession(str(sub / f"decoder_with_past_model{suffix}.onnx"), opts)
    hidden = enc.run(None, {"pixel_values": pixel_values})[0]
    ids = [0]
    out = dec.run(None, {"input_ids": np.array([[0]], dtype=np.int64), "encoder_hidden_states": hidden})
    names = [o.name for o in dec.get_outputs()]
    first_logits = out[0][0, -1].copy()
    while True:
        logits = out[0][0, -1]
        nxt = int(np.argmax(logits))
        ids.append(nxt)
        if nxt == 2 or len(ids) >= MAX_LENGTH:
            break
        feeds = {"input_ids": np.array([[nxt]], dtype=np.int64), "encoder_hidden_states": hidden}
        for name, val in zip(names, out):
            if name.startswith("present."):
                feeds["past_key_values." + name[len("present."):]] = val
        wanted = {i.name for i in dwp.get_inputs()}
        out = dwp.run(None, {k: v for k, v in feeds.items() if k in wanted})
        names = [o.name for o in dwp.get_outputs()]
    return ids[1:], first_logits


GEN_CASES = {
    "greedy": dict(num_beams=1),
    "greedy_min8_ngram3": dict(num_beams=1, min_length=8, no_repeat_ngram_size=3),
    "beam4": dict(num_beams=4),
    "beam4_ngram2_lp06_min5": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, min_length=5),
    "beam3_early_lp15": dict(num_beams=3, early_stopping=True, length_penalty=1.5),
    "beam5_never_len12": dict(num_beams=5, early_stopping="never", max_length=12),
}


def strip_generated(seq):
    """Generated ids without the decoder start token, up to and including </s>."""
    out = []
    for t in seq[1:]:
        out.append(int(t))
        if t == 2:
            break
    return out


def main():
    seed_everything(SEED)
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    BUNDLE.mkdir(parents=True)
    tok = train_tokenizer(BUNDLE)
    vocab_size = len(tok)
    model = build_model(vocab_size)
    model.generation_config = generation_config()
    model.save_pretrained(str(BUNDLE), safe_serialization=True)
    write_generation_config(BUNDLE / "generation_config.json")
    proc = ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    proc.save_pretrained(str(BUNDLE))
    onnx_export(BUNDLE)
    quantize(BUNDLE)

    # Same model, tokenizer given as vocab.json + merges.txt (as asi/gpt-fr-cased-small ships it).
    if SPLIT_TOK.exists():
        shutil.rmtree(SPLIT_TOK)
    SPLIT_TOK.mkdir()
    for name in ["config.json", "generation_config.json", "preprocessor_config.json",
                 "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(BUNDLE / name, SPLIT_TOK / name)
    for name in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]:
        shutil.copy(BUNDLE / name, SPLIT_TOK / name)

    files = make_images()
    n_layer = model.config.decoder.n_layer
    ref = {
        "generator": "scripts/make_fixtures.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "bundle": BUNDLE.name,
        "max_length": MAX_LENGTH,
        "vocab_size": vocab_size,
        "cases": {k: v for k, v in GEN_CASES.items()},
        "images": [],
    }
    margins = []
    for name in files:
        img = load_image(str(IMAGES / name))
        pv = proc(images=img, return_tensors="pt").pixel_values
        with torch.no_grad():
            enc_out = model.encoder(pixel_values=pv).last_hidden_state
            first = model(pixel_values=pv, decoder_input_ids=torch.tensor([[0]])).logits[0, -1]
        top2 = torch.topk(first, 2).values
        entry = {
            "file": name,
            "pixel_values": [round(float(x), 7) for x in pv.flatten().tolist()],
            "encoder_hidden_sum": float(enc_out.sum()),
            "first_step_logits": [float(x) for x in first.tolist()],
            "generate": {},
        }
        for case, kw in GEN_CASES.items():
            args = dict(max_length=MAX_LENGTH, do_sample=False)
            args.update(kw)
            with torch.no_grad():
                out = model.generate(pv, output_scores=True, return_dict_in_generate=True, **args)
            seq = out.sequences[0].tolist()
            toks = strip_generated(seq)
            res = {"tokens": toks, "text": tok.decode(toks, skip_special_tokens=True)}
            if getattr(out, "sequences_scores", None) is not None:
                res["score"] = float(out.sequences_scores[0])
            if case == "greedy":
                # Smallest top-1/top-2 logit gap along the greedy path: tells how robust token
                # equality is to float noise (int8 in particular).
                gaps = [float(torch.topk(s[0], 2).values[0] - torch.topk(s[0], 2).values[1]) for s in out.scores]
                res["min_margin"] = min(gaps)
                margins.append(min(gaps))
            entry["generate"][case] = res
        int8_tokens, _ = ort_greedy(BUNDLE, "_quantized", pv.numpy(), n_layer)
        fp32_tokens, ort_first = ort_greedy(BUNDLE, "", pv.numpy(), n_layer)
        entry["ort_fp32_greedy"] = fp32_tokens
        entry["ort_int8_greedy"] = int8_tokens
        entry["ort_fp32_first_step_max_abs_diff"] = float(np.abs(ort_first - first.numpy()).max())
        ref["images"].append(entry)
        print(f"{name:24s} greedy={entry['generate']['greedy']['text']!r} margin={entry['generate']['greedy']['min_margin']:.3f}"
              f" beam4={entry['generate']['beam4']['text']!r} int8==fp32:{int8_tokens == fp32_tokens}")

    # PIL-resized 224x224 images (before rescale/normalize): the standard ViT size, tested
    # bit for bit against the Rust resize.
    ref224 = FIX / "resized224"
    ref224.mkdir(exist_ok=True)
    for name in files:
        img = load_image(str(IMAGES / name))
        img.resize((224, 224), resample=Image.BILINEAR).save(ref224 / (Path(name).stem + ".png"))

    json.dump(ref, open(FIX / "reference.json", "w"), indent=1)
    print("min greedy margin over images:", min(margins))
    distinct = {tuple(e["generate"]["greedy"]["tokens"]) for e in ref["images"]}
    print("distinct greedy captions:", len(distinct), "of", len(ref["images"]))


if __name__ == "__main__":
    sys.exit(main())
