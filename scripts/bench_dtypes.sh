#!/usr/bin/env bash
# Which dtypes run in the node, how fast, how close to fp32 — next to onnxruntime on the same files.
#
#   scripts/bench_dtypes.sh BUNDLE [RUN_DIR]
#
# BUNDLE: a transformers.js-style bundle with onnx/encoder_model{suffix}.onnx +
# onnx/decoder_model_merged{suffix}.onnx per dtype (e.g. what scripts/make_fullsize_dtypes.py writes
# into OUT_DIR/optimum; Optimum's split decoder_model + decoder_with_past_model in onnx/ are timed
# too, for fp32). RUN_DIR (default ./bench-dtypes-DATE) receives every raw output and
# summary.json + table.md.
#
# Per dtype present (describe --json), one after the other, in this order:
#   1. vitgpt2-node bench --model BUNDLE --dtype D --threads 1 --reps REPS --json
#      (fp32: --layout optimum-merged,optimum: merged and split decoders timed in one process, or
#      two runs when this binary's --layout takes one value only; merged first, because the
#      process's peak RSS is a high-water mark: the split row's RSS includes the merged run's)
#   2. scripts/bench_dtypes_ort.py bench: onnxruntime on the same encoder + merged decoder
#      (1 intra-op thread, sequential, ORT_ENABLE_ALL): session load, encoder, one step at past
#      1/8/16/31, forced 16-token greedy caption; and greedy captions of IMAGES
#   3. vitgpt2-node caption --json --dtype D --layout optimum-merged --threads 1 IMAGES
#      (fp32: also --layout optimum, to check split = merged tokens)
# then scripts/bench_dtypes_ort.py summarize RUN_DIR.
#
# Environment: NODE (default ROOT/target/release/vitgpt2-node), PY (ROOT/.venv-ref/bin/python),
# REPS (3), DTYPES ("fp32 fp16 q8 int8 uint8 q4"), IMAGES (default: tests/fixtures/images/*.jpg and
# *.png except bad_*), QUIET_MAX_LOAD (1.5: the 1-minute load average above which the run is marked
# BUSY; the benchmark itself adds about 1), WAIT_QUIET (seconds to wait for the load to drop below
# QUIET_MAX_LOAD - 1 before starting; default 0 = do not wait).
# The 1-minute load average and the top CPU users are logged before and after every step in
# RUN_DIR/load.log; do not publish numbers from a run marked BUSY.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,30p' "$0"; exit 2; }
BUNDLE=$(cd "$1" && pwd) || exit 2
RUN=${2:-$PWD/bench-dtypes-$(date +%Y%m%d-%H%M%S)}
NODE=${NODE:-$ROOT/target/release/vitgpt2-node}
PY=${PY:-$ROOT/.venv-ref/bin/python}
REPS=${REPS:-3}
DTYPES=${DTYPES:-"fp32 fp16 q8 int8 uint8 q4"}
QUIET_MAX_LOAD=${QUIET_MAX_LOAD:-1.5}
WAIT_QUIET=${WAIT_QUIET:-0}
ORT="$ROOT/scripts/bench_dtypes_ort.py"
export QUIET_MAX_LOAD

if [ -n "${IMAGES:-}" ]; then
  read -r -a IMGS <<<"$IMAGES"
else
  IMGS=()
  for f in "$ROOT"/tests/fixtures/images/*.jpg "$ROOT"/tests/fixtures/images/*.png; do
    case "$(basename "$f")" in bad_*) ;; *) IMGS+=("$f") ;; esac
  done
fi

[ -x "$NODE" ] || { echo "no node binary at $NODE (cargo build --release first)" >&2; exit 2; }
mkdir -p "$RUN" || exit 2
RUN=$(cd "$RUN" && pwd) || exit 2
cd "$RUN" || exit 2
# Run a private copy: a cargo build replacing target/release/vitgpt2-node mid-run cannot mix binaries.
cp "$NODE" "$RUN/vitgpt2-node" || exit 2
NODE_ORIG=$NODE
NODE=$RUN/vitgpt2-node

load1() { cut -d' ' -f1 /proc/loadavg; }
logload() { # event
  local top
  # current CPU users (top's second frame; ps's %CPU is a lifetime average)
  top=$(top -b -n 2 -d 0.5 -w 200 2>/dev/null | awk '/^top -/{f++} f==2 && $1 ~ /^[0-9]+$/ && n<4 {printf "%s%s %s %s%%", (n?"; ":""), $12, $1, $9; n++}')
  printf '{"t":"%s","event":"%s","load1":%s,"load5":%s,"top":"%s"}\n' "$(date -Is)" "$1" \
    "$(load1)" "$(cut -d' ' -f2 /proc/loadavg)" "$top" >>load.log
}

if [ "$WAIT_QUIET" != 0 ]; then
  waited=0
  while awk -v l="$(load1)" -v m="$QUIET_MAX_LOAD" 'BEGIN{exit !(l > m - 1)}' && [ "$waited" -lt "$WAIT_QUIET" ]; do
    sleep 10; waited=$((waited + 10))
  done
fi

: >load.log
logload start
echo "run dir: $RUN"
echo "uptime at start: $(uptime)"
"$PY" - "$RUN/meta.json" "$BUNDLE" "$NODE" "$REPS" "$ROOT" "$NODE_ORIG" "${IMGS[@]}" <<'EOF'
import hashlib, json, os, subprocess, sys
out, bundle, node, reps, root, node_orig, *imgs = sys.argv[1:]
def sh(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"({e})"
h = hashlib.sha256(open(node, "rb").read()).hexdigest()
import onnxruntime
json.dump({"date": sh("date", "-Is"), "uptime": sh("uptime"), "nproc": os.cpu_count(), "bundle": bundle,
           "node": node_orig, "node_mtime": sh("date", "-Is", "-r", node_orig), "node_sha256": h, "node_version": sh(node, "--version"),
           "git": sh("git", "-C", root, "describe", "--always", "--dirty"), "reps": int(reps), "threads": 1,
           "images": imgs, "onnxruntime": onnxruntime.__version__, "cpu": sh("sh", "-c", "grep -m1 'model name' /proc/cpuinfo")},
          open(out, "w"), indent=1)
EOF

"$NODE" describe --model "$BUNDLE" --json >describe.json 2>describe.err || {
  echo "describe failed: $(head -1 describe.err)" >&2; exit 2; }
has() { # dtype layout
  "$PY" -c 'import json,sys; d=json.load(open("describe.json")); sys.exit(0 if any(g["dtype"]==sys.argv[1] and g["layout"]==sys.argv[2] for g in d["graph_sets"]) else 1)' "$1" "$2"
}
if "$NODE" bench --help | grep -A2 -- '--layout' | grep -qi 'comma'; then MULTI_LAYOUT=1; else MULTI_LAYOUT=0; fi

for d in $DTYPES; do
  if ! has "$d" optimum-merged; then echo "== $d: not in the bundle (describe), skipped"; continue; fi
  echo "== $d  (load $(load1))"
  # same page-cache state for the node and onnxruntime: read the dtype's files first
  s=$("$PY" -c 'import sys; print({"fp32":"","fp16":"_fp16","q8":"_quantized","int8":"_int8","uint8":"_uint8","q4":"_q4"}[sys.argv[1]])' "$d")
  cat "$BUNDLE"/onnx/encoder_model"$s".onnx* "$BUNDLE"/onnx/decoder_model_merged"$s".onnx* >/dev/null 2>&1
  [ "$d" = fp32 ] && cat "$BUNDLE"/onnx/decoder_model.onnx* "$BUNDLE"/onnx/decoder_with_past_model.onnx* >/dev/null 2>&1
  # 1. node bench
  logload "node bench $d"
  if [ "$d" = fp32 ] && has fp32 optimum; then
    if [ "$MULTI_LAYOUT" = 1 ]; then
      "$NODE" bench --model "$BUNDLE" --dtype "$d" --threads 1 --reps "$REPS" --layout optimum-merged,optimum --json \
        >"node_bench_$d.jsonl" 2>"node_bench_$d.err"
    else
      : >"node_bench_$d.jsonl"; : >"node_bench_$d.err"
      for lay in optimum-merged optimum; do
        "$NODE" bench --model "$BUNDLE" --dtype "$d" --threads 1 --reps "$REPS" --layout "$lay" --json \
          >>"node_bench_$d.jsonl" 2>>"node_bench_$d.err"
      done
    fi
  else
    "$NODE" bench --model "$BUNDLE" --dtype "$d" --threads 1 --reps "$REPS" --layout optimum-merged --json \
      >"node_bench_$d.jsonl" 2>"node_bench_$d.err"
  fi
  rc=$?; [ $rc = 0 ] || echo "   node bench $d: exit $rc: $(grep -m1 -i error "node_bench_$d.err")"
  logload "node bench $d done"
  # 2. onnxruntime on the same two files
  logload "ort bench $d"
  "$PY" "$ORT" bench "$BUNDLE" --dtype "$d" --reps "$REPS" --images "${IMGS[@]}" >"ort_bench_$d.json" 2>"ort_bench_$d.err"
  rc=$?; [ $rc = 0 ] || echo "   onnxruntime $d: exit $rc: $(tail -1 "ort_bench_$d.err")"
  logload "ort bench $d done"
  # 3. node captions (closeness to fp32)
  logload "node caption $d"
  "$NODE" caption --model "$BUNDLE" --json --dtype "$d" --layout optimum-merged --threads 1 "${IMGS[@]}" \
    >"node_caption_$d.jsonl" 2>"node_caption_$d.err"
  rc=$?; [ $rc = 0 ] || echo "   node caption $d: exit $rc: $(grep -m1 -i error "node_caption_$d.err")"
  if [ "$d" = fp32 ] && has fp32 optimum; then
    "$NODE" caption --model "$BUNDLE" --json --dtype fp32 --layout optimum --threads 1 "${IMGS[@]}" \
      >node_caption_fp32_split.jsonl 2>node_caption_fp32_split.err
    "$PY" -c '
import json,sys
a=[json.loads(l).get("tokens") for l in open("node_caption_fp32.jsonl") if l.startswith("{")]
b=[json.loads(l).get("tokens") for l in open("node_caption_fp32_split.jsonl") if l.startswith("{")]
print("   fp32 split = merged tokens (node):", sum(x==y for x,y in zip(a,b)), "/", len(a))'
  fi
  logload "node caption $d done"
done
logload end
echo "uptime at end: $(uptime)"
"$PY" "$ORT" summarize "$RUN"
