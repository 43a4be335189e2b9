#!/usr/bin/env python3
"""Interop fixtures for issue #13: Optimum's default (merged-decoder) export, laid out as
transformers.js repositories are, in every dtype transformers.js 4.x knows by file suffix, plus
onnxruntime / transformers reference tokens for the Rust node and tests/js/caption.mjs.

Run from the repository root with the reference venv (README, "Reference fixtures"):

    .venv-ref/bin/python scripts/make_interop_fixtures.py

Made and checked with Python 3.11, torch 2.15.0, transformers 4.57.6, optimum 2.1.0 +
optimum-onnx 0.1.0, onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6, pillow 13.0.0 (the pins that
optimum-onnx 0.1.0 brings; the exact versions used are written into reference.json). It needs no
network and nothing beyond that venv. Re-running rewrites tests/fixtures/interop/ with identical
bytes (seeds fixed, PYTHONHASHSEED=0 — the script re-executes itself with it — and no timestamps in
the graphs); it exits 1 if a cross-check below does not hold. About 70 s on 2 cores.

What it writes (tests/fixtures/interop/, README.md there has the details and sizes):

- The model: the tiny random ViT-GPT2 of tests/fixtures/tiny-vit-gpt2 (seeded by
  scripts/make_fixtures.py: 32x32 images, 2+2 layers, width 32, decoder weights sharpened),
  loaded from its model.safetensors with its tokenizer (420 ids, <s>=0 <pad>=1 </s>=2 <unk>=3),
  so token ids and captions are comparable with tests/fixtures/reference.json.
- `optimum.exporters.onnx.main_export(ckpt, task="image-to-text-with-past")` with default
  post-processing: encoder_model.onnx + decoder_model_merged.onnx (one top-level `If` on
  `use_cache_branch`). decoder_model.onnx / decoder_with_past_model.onnx are not kept.
- dtype variants made the way transformers.js's scripts/convert.py + scripts/quantize.py make
  them (their onnxruntime calls; for model_type vision-encoder-decoder convert.py sets
  per_channel=False and reduce_range=False for every 8-bit mode):
    _quantized (q8): ONNXQuantizer IntegerOps, dynamic, weights QUInt8 when the graph has a Conv
                     (the ViT encoder: patch embedding) else QInt8 (the GPT-2 decoder), per-tensor,
                     op types = IntegerOpsRegistry, EnableSubgraph=True, MatMulConstBOnly=True
    _int8:  same, weights QInt8          _uint8: same, weights QUInt8
    _fp16:  float16 conversion with keep_io_types=True, min_positive_val=1e-7,
            max_finite_val=1e4 and transformers.js's op block list (their float16.py is a fork of
            onnxruntime.transformers.float16, which is used here; see fp16_convert)
    _q4:    MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True, accuracy_level=None)
- bundles: optimum-all/ (every dtype in one onnx/ folder), optimum-q8/ (only the _quantized
  graphs, as many repositories ship), extdata-underscore/ and extdata-dot/ (the fp32 merged
  decoder re-saved with its weights in decoder_model_merged.onnx_data / .onnx.data).
- images/: 4 small synthetic RGB PNGs.
- reference.json: per image and dtype, onnxruntime greedy tokens over exactly these graphs (merged
  decoder driven through both branches, as transformers.js drives it), onnxruntime beam search
  (transformers' own beam search driving optimum's ORTModelForVision2Seq over the same graphs),
  transformers' PyTorch generate tokens and beam scores, greedy margins, and the cross-checks.
"""
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw

import transformers
from transformers import ViTImageProcessor, VisionEncoderDecoderModel
from transformers.image_utils import load_image

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-vit-gpt2"
OUT = ROOT / "tests" / "fixtures" / "interop"

MAX_LENGTH = 20
START, EOS = 0, 2
DTYPES = ["fp32", "q8", "int8", "uint8", "fp16", "q4"]
SUFFIX = {"fp32": "", "q8": "_quantized", "int8": "_int8", "uint8": "_uint8", "fp16": "_fp16", "q4": "_q4"}
# (width, height, drawing seed): chosen (see README) so that the four greedy captions differ, run
# long, one ends with </s>, and greedy margins stay clear of float noise for every dtype.
IMAGES = {
    "a_32x32.png": (32, 32, 36),
    "b_64x48.png": (64, 48, 10),
    "c_100x80.png": (100, 80, 54),
    "d_40x60.png": (40, 60, 0),
}
GEN = {
    "greedy": dict(num_beams=1),
    "beam3": dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    "beam3_ngram2": dict(num_beams=3, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=2),
}
ROOT_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


def seed_everything(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def versions():
    names = ["torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxscript",
             "tokenizers", "numpy", "pillow", "safetensors"]
    v = {"python": sys.version.split()[0]}
    for n in names:
        try:
            v[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            v[n] = None
    return v


# ----------------------------------------------------------------------------------- images

def draw_scene(w, h, seed):
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


def make_images(dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for name, (w, h, seed) in IMAGES.items():
        draw_scene(w, h, seed).save(dst / name, optimize=False)


# ------------------------------------------------------------------------------ onnx helpers

def all_ops(model):
    c = Counter()

    def walk(g):
        for n in g.node:
            c[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(model.graph)
    return c


def subgraph_outer_refs(node):
    """Names a node's subgraphs read from outer scopes (for topological sorting)."""
    refs = set()

    def walk(g, local):
        local = set(local) | {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            for x in n.input:
                if x and x not in local:
                    refs.add(x)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, local)
            local |= set(n.output)
        for o in g.output:
            if o.name not in local:
                refs.add(o.name)

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            walk(a.g, set())
    return refs


def toposort_graph(g):
    """Stable topological sort of g.node (and of every subgraph), outer-scope reads included."""
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                toposort_graph(a.g)
    avail = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    deps = [set(n.input) | subgraph_outer_refs(n) for n in nodes]
    produced_here = {o for n in nodes for o in n.output}
    deps = [{d for d in ds if d in produced_here} for ds in deps]  # the rest comes from outside
    done, order = set(), []
    while len(order) < len(nodes):
        progressed = False
        for i, n in enumerate(nodes):
            if i in done or not deps[i] <= avail:
                continue
            order.append(n)
            done.add(i)
            avail |= set(n.output)
            progressed = True
        if not progressed:
            raise RuntimeError(f"graph {g.name}: cycle or missing producer")
    del g.node[:]
    g.node.extend(order)


def op_delta(path, base_path):
    """Per op type: count in path minus count in base_path (all subgraphs included), non-zero only."""
    a, b = all_ops(onnx.load(str(path))), all_ops(onnx.load(str(base_path)))
    return {k: a[k] - b[k] for k in sorted(set(a) | set(b)) if a[k] != b[k]}


def ops_in(model):
    return set(all_ops(model))


# ---------------------------------------------------------------------- dtype conversions

def quantize_8bit(model, mode):
    """transformers.js scripts/quantize.py quantize_q8, with the settings convert.py uses for
    model_type vision-encoder-decoder (per_channel=False, reduce_range=False)."""
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    if mode == "q8":
        quint8_ops = ("Conv", "GroupQueryAttention", "MultiHeadAttention")
        weight_type = QuantType.QUInt8 if ops_in(model) & set(quint8_ops) else QuantType.QInt8
    elif mode == "int8":
        weight_type = QuantType.QInt8
    else:
        weight_type = QuantType.QUInt8
    q = ONNXQuantizer(
        model,
        False,  # per_channel
        False,  # reduce_range
        mode=QuantizationMode.IntegerOps,
        static=False,
        weight_qType=weight_type,
        activation_qType=QuantType.QUInt8,
        tensors_range=None,
        nodes_to_quantize=[],
        nodes_to_exclude=[],
        op_types_to_quantize=set(IntegerOpsRegistry.keys()),
        extra_options=dict(EnableSubgraph=True, MatMulConstBOnly=True),
    )
    q.quantize_model()
    return q.model.model, weight_type.name


# transformers.js scripts/float16.py DEFAULT_OP_BLOCK_LIST (onnxruntime's list without Range,
# plus Resize, RandomNormalLike and Cast).
FP16_OP_BLOCK_LIST = [
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer",
    "FeatureVectorizer", "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor",
    "Normalizer", "OneHotEncoder", "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler",
    "TreeEnsembleClassifier", "TreeEnsembleRegressor", "ZipMap", "NonMaxSuppression", "TopK",
    "RoiAlign", "Resize", "CumSum", "Min", "Max", "Upsample", "RandomNormalLike", "Cast",
]


def uniquify_branch_names(model):
    """Prefixes every tensor and node name produced inside the top-level If's branches with the
    branch name (no_past/..., with_past/...). Only names change.

    Optimum's two branches are two separate exports, so the same name often means different
    tensors in each (/decoder/transformer/Cast_1_output_0 is float in one branch and int64 in the
    other), and the branch outputs are named like the If outputs (logits, present.*).
    onnxruntime's float16 converter keys its bookkeeping by name across the whole model, so
    without this it casts an int64 tensor to float16 and returns outer-scope values from the
    branches (onnxruntime then refuses the model). transformers.js's own float16.py processes
    each graph on its own."""
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        for a in node.attribute:
            if a.type != onnx.AttributeProto.GRAPH:
                continue
            g = a.g
            ren = {o: f"{g.name}/{o}" for n in g.node for o in n.output if o}
            for n in g.node:
                n.name = f"{g.name}/{n.name}"
                for i, x in enumerate(n.output):
                    if x in ren:
                        n.output[i] = ren[x]
                for i, x in enumerate(n.input):
                    if x in ren:
                        n.input[i] = ren[x]
                for att in n.attribute:
                    if att.type == onnx.AttributeProto.GRAPH:
                        raise NotImplementedError("nested subgraphs")
            for o in list(g.output) + list(g.value_info):
                if o.name in ren:
                    o.name = ren[o.name]
    return model


def relocate_subgraph_casts(model):
    """onnxruntime's float16 converter adds the Cast nodes around blocked nodes (here: the Cast
    nodes, blocked as transformers.js blocks them) to the top-level graph even when the blocked
    node lives in an If branch, where the tensor they read is produced. Move each such Cast into
    every subgraph that produces its input, right after the producer (transformers.js's
    float16.py inserts them in the node's own graph). Casts can read other misplaced casts, so
    this repeats until none is left."""
    g = model.graph
    total = 0
    while True:
        top = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        misplaced = [n for n in g.node if any(x and x not in top for x in n.input)]
        if not misplaced:
            break
        moved = set()

        def walk(sg):
            nodes = list(sg.node)
            produced = {o: i for i, n in enumerate(nodes) for o in n.output}
            inserts = {}
            for m in misplaced:
                src = m.input[0]
                if src in produced and not any(x.name == m.name for x in inserts.get(produced[src], [])):
                    c = onnx.NodeProto()
                    c.CopyFrom(m)
                    inserts.setdefault(produced[src], []).append(c)
                    moved.add(m.name)
            out = []
            for i, n in enumerate(nodes):
                out.append(n)
                out.extend(inserts.get(i, []))
            del sg.node[:]
            sg.node.extend(out)
            for n in nodes:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)

        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
        if not moved:
            raise RuntimeError(f"fp16: cannot place {sorted(n.name for n in misplaced)}")
        total += len(moved)
        keep = [n for n in g.node if n.name not in moved]
        del g.node[:]
        g.node.extend(keep)
    scope = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    vi = [v for v in g.value_info if v.name in scope]
    del g.value_info[:]
    g.value_info.extend(vi)
    return total


def fp16_convert(model):
    from onnxruntime.transformers import float16

    model = uniquify_branch_names(model)
    m = float16.convert_float_to_float16(
        model,
        min_positive_val=1e-7,
        max_finite_val=1e4,
        keep_io_types=True,
        disable_shape_infer=False,
        op_block_list=FP16_OP_BLOCK_LIST,
    )
    relocate_subgraph_casts(m)
    toposort_graph(m.graph)  # the converter appends the I/O casts at the end
    return m


def quantize_q4(model):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=None)
    q.process()
    return q.model.model


def make_variant(src: Path, dtype):
    m = onnx.load(str(src))
    if dtype in ("q8", "int8", "uint8"):
        m, wt = quantize_8bit(m, dtype)
        how = f"ONNXQuantizer IntegerOps dynamic, weight {wt}, per-tensor, reduce_range False, EnableSubgraph, MatMulConstBOnly"
    elif dtype == "fp16":
        m = fp16_convert(m)
        how = "onnxruntime.transformers.float16 keep_io_types=True min_positive_val=1e-7 max_finite_val=1e4, transformers.js op block list"
    elif dtype == "q4":
        m = quantize_q4(m)
        how = "MatMulNBitsQuantizer bits=4 block_size=32 is_symmetric=True accuracy_level=None"
    else:
        raise ValueError(dtype)
    # onnxruntime 1.32's quantizer appends the Gather dequantization nodes it adds inside the If
    # branches after their consumers (onnxruntime itself does not mind; onnx.checker, and so
    # optimum's check_and_save_model that transformers.js's script saves with, refuse it):
    # restore topological order (node order only).
    toposort_graph(m.graph)
    onnx.checker.check_model(m)
    return m, how


# --------------------------------------------------------------- split merged decoder (probe)

def specialize_if(model, branch_value: bool):
    """Returns a copy of an Optimum merged decoder with its top-level `If` on use_cache_branch
    replaced by the chosen branch's nodes (True: then_branch = with_past, False: else_branch =
    no_past); use_cache_branch and unused inputs/initializers are dropped. Other top-level nodes
    (the fp16 variant's input/output casts) are kept."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = []
    for n in g.node:
        if n.op_type == "If" and n.input[0] == "use_cache_branch":
            branch = next(a.g for a in n.attribute if a.name == ("then_branch" if branch_value else "else_branch"))
            nodes.extend(branch.node)
            g.initializer.extend(branch.initializer)
            for bo, io in zip(branch.output, n.output):
                if bo.name != io:
                    nodes.append(onnx.helper.make_node("Identity", [bo.name], [io], name=f"{io}__identity"))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # prune: keep what the outputs need
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if set(n.output) & needed:
            keep.append(n)
            needed |= set(n.input) | subgraph_outer_refs(n)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inputs = [i for i in g.input if i.name in needed and i.name != "use_cache_branch"]
    del g.input[:]
    g.input.extend(inputs)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    toposort_graph(g)
    onnx.checker.check_model(m)
    return m


# ------------------------------------------------------------------------- onnxruntime runs

def session(path_or_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def margin_of(logits):
    top = np.sort(logits.astype(np.float64))[-2:]
    return float(top[1] - top[0])


def ort_greedy_merged(enc, dec, pixel_values, past_len0=0):
    """transformers.js's loop: step 0 feeds use_cache_branch=False with zero-filled past of
    length 0 (its empty-cache shapes resolve every symbolic dim but batch_size to 0), later steps
    use_cache_branch=True with the previous step's present.* as past_key_values.*."""
    hidden = enc.run(None, {"pixel_values": pixel_values})[0]
    ins = {i.name: i for i in dec.get_inputs()}
    out_names = [o.name for o in dec.get_outputs()]
    past = {}
    for name, i in ins.items():
        if name.startswith("past_key_values."):
            shape = [1 if d == "batch_size" else (past_len0 if isinstance(d, str) or d is None else d) for d in i.shape]
            past[name] = np.zeros(shape, np.float32)
    ids, margins, tok, first = [], [], START, None
    shapes = []
    for step in range(MAX_LENGTH - 1):
        feed = {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([step > 0]), **past}
        out = dict(zip(out_names, dec.run(None, feed)))
        logits = out["logits"][0, -1]
        if first is None:
            first = logits.astype(np.float32).copy()
        margins.append(margin_of(logits))
        tok = int(np.argmax(logits))
        ids.append(tok)
        shapes.append(list(out["present.0.key"].shape))
        past = {"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        if tok == EOS:
            break
    return ids, margins, first, shapes


def ort_greedy_split(enc, dec0, dec1, pixel_values):
    """Optimum's two-graph loop over the split graphs (no use_cache_branch, no past at step 0)."""
    hidden = enc.run(None, {"pixel_values": pixel_values})[0]
    ids, tok, past = [], START, None
    for step in range(MAX_LENGTH - 1):
        d = dec0 if past is None else dec1
        feed = {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": hidden, **(past or {})}
        wanted = {i.name for i in d.get_inputs()}
        out = dict(zip([o.name for o in d.get_outputs()], d.run(None, {k: v for k, v in feed.items() if k in wanted})))
        tok = int(np.argmax(out["logits"][0, -1]))
        ids.append(tok)
        past = {"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        if tok == EOS:
            break
    return ids


def strip_generated(seq):
    """Generated ids without the decoder start token, up to and including </s>."""
    out = []
    for t in list(seq)[1:]:
        out.append(int(t))
        if t == EOS:
            break
    return out


def generate(model, pv, case):
    args = dict(max_length=MAX_LENGTH, do_sample=False, output_scores=True, return_dict_in_generate=True,
                decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=1)
    args.update(GEN[case])
    with torch.no_grad():
        out = model.generate(pixel_values=pv, **args)
    res = {"tokens": strip_generated(out.sequences[0].tolist())}
    if getattr(out, "sequences_scores", None) is not None:
        res["score"] = float(out.sequences_scores[0])
    else:
        gaps = [margin_of(s[0].float().numpy()) for s in out.scores]
        res["min_margin"] = min(gaps)
    return res


def ort_vision2seq(bundle: Path, dtype, tmp: Path):
    """optimum's ORTModelForVision2Seq over exactly the dtype's two graphs (copied under the
    standard names, because its file lookup only finds a merged decoder by that name)."""
    from optimum.onnxruntime import ORTModelForVision2Seq

    d = tmp / f"ortmodel-{dtype}"
    (d / "onnx").mkdir(parents=True)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(bundle / f, d / f)
    shutil.copy(bundle / "onnx" / f"encoder_model{SUFFIX[dtype]}.onnx", d / "onnx" / "encoder_model.onnx")
    shutil.copy(bundle / "onnx" / f"decoder_model_merged{SUFFIX[dtype]}.onnx", d / "onnx" / "decoder_model_merged.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    m = ORTModelForVision2Seq.from_pretrained(str(d), subfolder="onnx", use_merged=True, use_cache=True,
                                              session_options=so)
    assert m.decoder.is_merged
    return m


# ------------------------------------------------------------------------------------- main

def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    # Optimum's merge deduplicates the lm_head weight that decoder_model and
    # decoder_with_past_model both carry (as onnx::MatMul_1091 / _1096) and which name survives
    # follows Python's per-process string hashing: fix it so reruns give identical bytes.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    seed_everything(0)
    tmp = Path(tempfile.mkdtemp(prefix="interop-"))
    try:
        return build(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(tmp: Path):
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    # 1. checkpoint staged from tests/fixtures/tiny-vit-gpt2, exported by Optimum (default mode)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    for f in ["config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]:
        shutil.copy(TINY / f, ckpt / f)
    from optimum.exporters.onnx import main_export

    export = tmp / "export"
    main_export(str(ckpt), output=str(export), task="image-to-text-with-past")
    assert (export / "decoder_model_merged.onnx").exists(), "Optimum did not write a merged decoder"

    # 2. bundles
    allb = OUT / "optimum-all"
    (allb / "onnx").mkdir(parents=True)
    for f in ROOT_FILES:
        shutil.copy(export / f, allb / f)
    # save_pretrained drops generation settings equal to their defaults: the explicit file of
    # tests/fixtures/tiny-vit-gpt2 (max_length 20, num_beams 1, ...) replaces the exported one.
    shutil.copy(TINY / "generation_config.json", allb / "generation_config.json")
    quant_cfg = {"modes": [d for d in DTYPES if d != "fp32"], "per_channel": False, "reduce_range": False,
                 "block_size": 32, "is_symmetric": True, "accuracy_level": None, "quant_type": 1,
                 "op_block_list": None,
                 "note": "made by scripts/make_interop_fixtures.py the way transformers.js scripts/quantize.py does"}
    write_json(allb / "quantize_config.json", quant_cfg)
    graphs = {}
    for base in ("encoder_model", "decoder_model_merged"):
        shutil.copy(export / f"{base}.onnx", allb / "onnx" / f"{base}.onnx")
    how = {"fp32": "optimum main_export(task='image-to-text-with-past'), default post-processing (merged decoder)"}
    for dtype in DTYPES[1:]:
        hs = []
        for base in ("encoder_model", "decoder_model_merged"):
            m, h = make_variant(export / f"{base}.onnx", dtype)
            onnx.save(m, str(allb / "onnx" / f"{base}{SUFFIX[dtype]}.onnx"))
            hs.append(f"{base}: {h}")
        how[dtype] = "; ".join(hs)
    for dtype in DTYPES:
        e = allb / "onnx" / f"encoder_model{SUFFIX[dtype]}.onnx"
        d = allb / "onnx" / f"decoder_model_merged{SUFFIX[dtype]}.onnx"
        graphs[dtype] = {
            "encoder": str(e.relative_to(OUT)), "decoder": str(d.relative_to(OUT)),
            "encoder_sha256": sha256(e), "decoder_sha256": sha256(d),
            "encoder_bytes": e.stat().st_size, "decoder_bytes": d.stat().st_size,
            "how": how[dtype],
            "decoder_op_count_change_vs_fp32": op_delta(d, allb / "onnx" / "decoder_model_merged.onnx"),
            "encoder_op_count_change_vs_fp32": op_delta(e, allb / "onnx" / "encoder_model.onnx"),
        }

    q8b = OUT / "optimum-q8"
    (q8b / "onnx").mkdir(parents=True)
    for f in ROOT_FILES + ["quantize_config.json"]:
        shutil.copy(allb / f, q8b / f)
    for base in ("encoder_model", "decoder_model_merged"):
        shutil.copy(allb / "onnx" / f"{base}_quantized.onnx", q8b / "onnx" / f"{base}_quantized.onnx")

    ext = {}
    for folder, location in (("extdata-underscore", "decoder_model_merged.onnx_data"),
                             ("extdata-dot", "decoder_model_merged.onnx.data")):
        b = OUT / folder
        (b / "onnx").mkdir(parents=True)
        for f in ROOT_FILES:
            shutil.copy(allb / f, b / f)
        shutil.copy(allb / "onnx" / "encoder_model.onnx", b / "onnx" / "encoder_model.onnx")
        m = onnx.load(str(allb / "onnx" / "decoder_model_merged.onnx"))
        onnx.save(m, str(b / "onnx" / "decoder_model_merged.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=location, size_threshold=0)
        n_ext = sum(1 for t in onnx.load(str(b / "onnx" / "decoder_model_merged.onnx"), load_external_data=False).graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL)
        ext[folder] = {"location": location, "external_initializers": n_ext,
                       "onnx_bytes": (b / "onnx" / "decoder_model_merged.onnx").stat().st_size,
                       "data_bytes": (b / "onnx" / location).stat().st_size}

    # 3. images and preprocessing (transformers' load_image + ViTImageProcessor, PIL bilinear)
    imgdir = OUT / "images"
    make_images(imgdir)
    proc = ViTImageProcessor.from_pretrained(str(allb))
    pixels = {}
    size = (proc.size["width"], proc.size["height"])
    (imgdir / "resized32").mkdir()
    for name in IMAGES:
        img = load_image(str(imgdir / name))
        pv = proc(images=img, return_tensors="pt").pixel_values
        pixels[name] = pv
        # The same image already resized by PIL as ViTImageProcessor resizes it (uint8, BILINEAR):
        # for transformers.js, whose resize (sharp) gives other pixels; at 32x32 it resizes nothing.
        img.resize(size, resample=Image.BILINEAR).save(imgdir / "resized32" / name, optimize=False)
        pv32 = proc(images=load_image(str(imgdir / "resized32" / name)), return_tensors="pt").pixel_values
        assert torch.equal(pv, pv32), f"{name}: PIL-resized copy gives other pixel values"

    # 4. transformers (PyTorch) reference on the same weights
    model = VisionEncoderDecoderModel.from_pretrained(str(TINY)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(allb))
    torch_ref = {case: {} for case in GEN}
    for name, pv in pixels.items():
        for case in GEN:
            r = generate(model, pv, case)
            r["text"] = tok.decode(r["tokens"], skip_special_tokens=True)
            torch_ref[case][name] = r

    # 5. onnxruntime: greedy loop over the merged graphs, beam search through optimum + transformers
    variants = {}
    checks = {"ort_fp32_greedy_equals_transformers": {}, "ort_fp32_beam_equals_transformers": {},
              "ort_generate_greedy_equals_loop": {}, "split_branches_equal_merged": {},
              "external_data_equals_fp32": {}, "first_step_past_len1_equals_len0": {},
              "first_step_with_past_branch_empty_past_equals_no_past_branch": {},
              "fp32_first_step_logits_max_abs_diff_vs_transformers": {}}
    for dtype in DTYPES:
        g = graphs[dtype]
        enc = session(str(OUT / g["encoder"]))
        dec = session(str(OUT / g["decoder"]))
        dmodel = onnx.load(str(OUT / g["decoder"]))
        split0 = session(specialize_if(dmodel, False).SerializeToString())
        split1 = session(specialize_if(dmodel, True).SerializeToString())
        ortm = ort_vision2seq(allb, dtype, tmp)
        v = {**g, "greedy": {}, "beam3": {}, "beam3_ngram2": {}}
        split_ok, gen_ok = [], []
        for name, pv in pixels.items():
            ids, margins, first, shapes = ort_greedy_merged(enc, dec, pv.numpy())
            v["greedy"][name] = {"tokens": ids, "text": tok.decode(ids, skip_special_tokens=True),
                                 "min_margin": min(margins), "min_margin_step": int(np.argmin(margins))}
            split_ok.append(ort_greedy_split(enc, split0, split1, pv.numpy()) == ids)
            for case in GEN:
                args = dict(max_length=MAX_LENGTH, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, decoder_start_token_id=START, eos_token_id=EOS,
                            pad_token_id=1, **GEN[case])
                with torch.no_grad():
                    out = ortm.generate(pixel_values=pv, **args)
                toks = strip_generated(out.sequences[0].tolist())
                if case == "greedy":
                    gen_ok.append(toks == ids)
                    continue
                v[case][name] = {"tokens": toks, "score": float(out.sequences_scores[0])}
            if dtype == "fp32":
                ids1, _, first1, _ = ort_greedy_merged(enc, dec, pv.numpy(), past_len0=1)
                checks["first_step_past_len1_equals_len0"][name] = bool(ids1 == ids and np.array_equal(first1, first))
                hidden = enc.run(None, {"pixel_values": pv.numpy()})[0]
                feed = {"input_ids": np.array([[START]], np.int64), "encoder_hidden_states": hidden,
                        **{i.name: np.zeros((1, 4, 0, 8), np.float32) for i in dec.get_inputs() if i.name.startswith("past_key_values.")}}
                no_past = dec.run(["logits"], {**feed, "use_cache_branch": np.array([False])})[0]
                with_past = dec.run(["logits"], {**feed, "use_cache_branch": np.array([True])})[0]
                checks["first_step_with_past_branch_empty_past_equals_no_past_branch"][name] = float(np.abs(no_past - with_past).max())
                with torch.no_grad():
                    tl = model(pixel_values=pv, decoder_input_ids=torch.tensor([[START]])).logits[0, -1].numpy()
                checks["fp32_first_step_logits_max_abs_diff_vs_transformers"][name] = float(np.abs(tl - first).max())
                v.setdefault("present_shapes_per_step", {})[name] = shapes[:3]
        v["min_greedy_margin"] = min(x["min_margin"] for x in v["greedy"].values())
        checks["split_branches_equal_merged"][dtype] = split_ok
        checks["ort_generate_greedy_equals_loop"][dtype] = gen_ok
        variants[dtype] = v
        print(f"{dtype:6s} min greedy margin {v['min_greedy_margin']:.3f}  split==merged {split_ok}  generate==loop {gen_ok}")
        for name in pixels:
            print(f"   {name:14s} greedy {v['greedy'][name]['tokens']}")

    for name in pixels:
        checks["ort_fp32_greedy_equals_transformers"][name] = variants["fp32"]["greedy"][name]["tokens"] == torch_ref["greedy"][name]["tokens"]
        checks["ort_fp32_beam_equals_transformers"][name] = all(
            variants["fp32"][c][name]["tokens"] == torch_ref[c][name]["tokens"]
            and abs(variants["fp32"][c][name]["score"] - torch_ref[c][name]["score"]) < 1e-4
            for c in ("beam3", "beam3_ngram2"))
    for folder in ext:
        enc = session(str(OUT / folder / "onnx" / "encoder_model.onnx"))
        dec = session(str(OUT / folder / "onnx" / "decoder_model_merged.onnx"))
        checks["external_data_equals_fp32"][folder] = [
            ort_greedy_merged(enc, dec, pv.numpy())[0] == variants["fp32"]["greedy"][name]["tokens"]
            for name, pv in pixels.items()]

    # 6. requirements on the outcome (fail loudly rather than write weak fixtures)
    fp32 = variants["fp32"]["greedy"]
    problems = []
    if len({tuple(fp32[n]["tokens"]) for n in pixels}) != len(pixels):
        problems.append("fp32 greedy captions are not all different")
    if not any(fp32[n]["tokens"][-1:] == [EOS] for n in pixels):
        problems.append("no fp32 greedy caption ends with </s>")
    for section, vals in checks.items():
        if section.endswith("max_abs_diff_vs_transformers"):
            bad = [k for k, x in vals.items() if x > 1e-4]
        elif section.startswith("first_step_with_past"):
            bad = [k for k, x in vals.items() if x > 1e-5]
        else:
            bad = [k for k, x in vals.items() if not (all(x) if isinstance(x, list) else x)]
        if bad:
            problems.append(f"check {section} failed for {bad}")
    if variants["fp32"]["min_greedy_margin"] < 0.05:
        problems.append(f"fp32 min greedy margin {variants['fp32']['min_greedy_margin']:.3f} < 0.05")

    ref = {
        "generator": "scripts/make_interop_fixtures.py",
        "versions": versions(),
        "model": "tests/fixtures/tiny-vit-gpt2 (model.safetensors and tokenizer), exported by Optimum's default image-to-text-with-past export",
        "max_length": MAX_LENGTH,
        "decoder_start_token_id": START,
        "eos_token_id": EOS,
        "tokens_note": "generated ids without the decoder start token, up to and including </s> (2)",
        "settings": {k: {**dict(max_length=MAX_LENGTH, do_sample=False), **v} for k, v in GEN.items()},
        "images": {name: {"size": list(IMAGES[name][:2]), "resized32": f"images/resized32/{name}",
                          "pixel_values_sum": float(pv.double().sum()),
                          "pixel_values_sha256_f32le": hashlib.sha256(pv.numpy().astype("<f4").tobytes()).hexdigest()}
                   for name, pv in pixels.items()},
        "bundles": {
            "optimum-all": {"dtypes": DTYPES, "graphs": sorted(p.name for p in (allb / "onnx").iterdir())},
            "optimum-q8": {"dtypes": ["q8"], "graphs": sorted(p.name for p in (q8b / "onnx").iterdir())},
            **{k: {"dtypes": ["fp32"], "graphs": sorted(p.name for p in (OUT / k / "onnx").iterdir()), **v}
               for k, v in ext.items()},
        },
        "transformers_fp32": torch_ref,
        "onnxruntime": variants,
        "checks": checks,
    }
    write_json(OUT / "reference.json", ref)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {total:,} bytes")
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
