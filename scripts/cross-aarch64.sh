#!/usr/bin/env bash
# Cross-builds vitgpt2-node for 64-bit ARM (aarch64-unknown-linux-gnu: Raspberry Pi 4/5, Jetson,
# i.MX8) and checks under qemu that it captions exactly as the x86-64 build does: same token ids
# and captions for every test image and bundle, scores within 1e-4 (fp32; int8: see below).
#
#   scripts/cross-aarch64.sh [--install]
#
# --install sets up the cross toolchain first (root): Debian's gcc-aarch64-linux-gnu and
# qemu-user, and rustup's aarch64 standard library.
# X86_NODE: the x86-64 binary to compare with (default: build it in release).
# ARM_NODE: an already built aarch64 binary (default: build it).
# PROFILE: cargo profile of the builds (default release; CI uses cross-check, which skips LTO to
# build faster and computes the same numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

if [ "${1:-}" = "--install" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
  rustup target add "$TARGET"
fi
need() { command -v "$1" >/dev/null || { echo "error: $1 not found: $2 (or run $0 --install)" >&2; exit 2; }; }
need aarch64-linux-gnu-gcc "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
need qemu-aarch64 "apt-get install qemu-user"
rustup target list --installed | grep -qx "$TARGET" || { echo "error: rustup target add $TARGET" >&2; exit 2; }

TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-release}
ARM=${ARM_NODE:-$TARGET_DIR/$TARGET/$PROFILE/vitgpt2-node}
if [ -z "${ARM_NODE:-}" ]; then
  echo "== cross-building vitgpt2-node for $TARGET ($PROFILE)"
  cargo build --locked --profile "$PROFILE" --target "$TARGET" --bin vitgpt2-node ${NODE_FEATURES:-}
fi
file "$ARM" 2>/dev/null || true
if [ -z "${X86_NODE:-}" ]; then
  cargo build --locked --profile "$PROFILE" --bin vitgpt2-node ${NODE_FEATURES:-}
  X86_NODE="$TARGET_DIR/$PROFILE/vitgpt2-node"
fi

images=()
for f in tests/fixtures/images/*; do
  case "$(basename "$f")" in bad_*) ;; *) images+=("$f") ;; esac
done
# The demo bundle's own held-out scenes too: images it was trained for, not only far-off ones.
[ -d models/synthetic-fr/samples ] && images+=(models/synthetic-fr/samples/*.png)
bundles=(tests/fixtures/tiny-vit-gpt2)
[ -d models/synthetic-fr ] && bundles+=(models/synthetic-fr)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for bundle in "${bundles[@]}"; do
  for precision in fp32 int8; do
    for beams in 1 4; do
      args=(caption --json --precision "$precision" --num-beams "$beams" --model "$bundle" "${images[@]}")
      if ! "$X86_NODE" "${args[@]}" >"$out/x86.jsonl" 2>"$out/x86.err"; then
        # A bundle without int8 graphs: nothing to compare.
        grep -q "missing graph" "$out/x86.err" && continue
        cat "$out/x86.err" >&2; exit 1
      fi
      qemu-aarch64 -L "$SYSROOT" "$ARM" "${args[@]}" >"$out/arm.jsonl"
      # The demo bundle was trained on 64-px synthetic shapes only: on the fixture photos its int8
      # greedy output is a degenerate loop (« grands carrés carrés … », 48 tokens) that passes a
      # near-tie at many steps, and once one flips the two paths part for the rest of the caption
      # (seen: street.jpg, step 19 of 48, scores −0.689 / −0.711). So for that bundle in int8,
      # only its own held-out scenes are held to identity; other divergences are reported.
      strict=all
      [ "$bundle" = models/synthetic-fr ] && [ "$precision" = int8 ] && strict=models/synthetic-fr/samples/
      if python3 - "$out/x86.jsonl" "$out/arm.jsonl" "$precision" "$strict" <<'EOF'
import json, sys
x86 = [json.loads(l) for l in open(sys.argv[1])]
arm = [json.loads(l) for l in open(sys.argv[2])]
strict = lambda image: sys.argv[4] == "all" or image.startswith(sys.argv[4])
assert len(x86) == len(arm), f"{len(x86)} vs {len(arm)} lines"
# NEON and AVX kernels sum in different orders: fp32 scores (mean log-probs) agree to ~1e-7 and
# the tokens must be identical. int8 graphs quantize activations on the fly (round(x / scale)): a
# last-bit difference can flip one rounding and move that activation by a whole step, so scores
# agree to ~1e-3 there — and where two hypotheses are tied that closely (a degenerate repeated
# token on an image far from the training data, under beam search), either may win. So for int8 a
# different result is accepted only as such a near-tie: both best scores within the tolerance.
int8 = sys.argv[3] != "fp32"
tol = 5e-3 if int8 else 1e-4
worst, ties, loose = 0.0, [], []
for a, b in zip(x86, arm):
    d = abs(a["score"] - b["score"])
    if a["tokens"] != b["tokens"] and not strict(a["image"]):
        loose.append(f"{a['image']} (scores {a['score']:.5f} / {b['score']:.5f})")
        continue
    worst = max(worst, d)
    if a["tokens"] != b["tokens"]:
        assert int8 and d < tol, f"{a['image']}: tokens differ: {a['tokens']} ({a['score']}) vs {b['tokens']} ({b['score']})"
        ties.append(f"{a['image']} (scores {a['score']:.5f} / {b['score']:.5f})")
    else:
        assert a["caption"] == b["caption"], f"{a['image']}: captions differ"
assert worst < tol, f"scores differ by {worst} (tolerance {tol})"
same = len(x86) - len(ties) - len(loose)
print(f"   {len(x86)} images: tokens and captions identical on {same}, max score difference {worst:.2e}"
      + (f"; near-ties resolved differently: {', '.join(ties)}" if ties else "")
      + (f"; far-off images that diverged (not held to identity): {', '.join(loose)}" if loose else ""))
EOF
      then echo "ok $bundle $precision beams=$beams"; else echo "FAILED $bundle $precision beams=$beams"; status=1; fi
    done
  done
done
exit $status
