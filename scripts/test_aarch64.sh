#!/usr/bin/env bash
# Builds the CPU backend's unit tests for aarch64 and runs them under qemu-user, on an
# emulated CPU with the dot-product extension (`max`: the `sdot` kernel) and on one without
# it (`cortex-a53`, Armv8.0: the widening-multiply kernel), so the NEON paths are compiled
# for their real target and checked against the scalar oracle on every test run. Then the
# device examples: `examples/phone-arm64` runs SmolLM2 under emulation and must produce the
# x86 build's tokens, and `examples/android-jni`'s library must build and export its JNI
# entry points.
#
# The rustup toolchain here has no aarch64 standard library, so this uses Debian's
# `rustc-web`/`cargo-web` with `libstd-rust-web-dev:arm64`, the cross linker and qemu-user,
# installed with apt when missing (needs root, as on the development and CI machines).
# The test binary is linked dynamically against Debian's arm64 C library (a multiarch package
# that libstd-rust-web-dev:arm64 brings), which qemu-user loads from /lib.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=/usr/bin/cargo
RUSTC=/usr/bin/rustc
TARGET=aarch64-unknown-linux-gnu

have_tools() {
    [ -x "$CARGO" ] && [ -x "$RUSTC" ] && command -v aarch64-linux-gnu-gcc >/dev/null &&
        command -v qemu-aarch64 >/dev/null && [ -e /lib/ld-linux-aarch64.so.1 ] &&
        [ -d "$("$RUSTC" --print sysroot)/lib/rustlib/$TARGET/lib" ]
}

if ! have_tools; then
    echo "test_aarch64: installing the aarch64 cross toolchain and qemu-user (Debian packages)"
    if [ "$(id -u)" != 0 ]; then
        echo "test_aarch64: needs root to install packages (rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)" >&2
        exit 1
    fi
    dpkg --add-architecture arm64
    # Two tries: a mirror's passing hiccup should not fail the whole test run.
    for try in 1 2; do
        if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
            libc6-dev-arm64-cross qemu-user >/dev/null; then
            break
        fi
        [ "$try" = 2 ] || { echo "test_aarch64: apt failed, trying once more in 20 s" >&2; sleep 20; }
    done
    have_tools || { echo "test_aarch64: the cross toolchain is still incomplete after installing" >&2; exit 1; }
fi

echo "test_aarch64: $("$RUSTC" --version), $(qemu-aarch64 --version | head -n 1)"
export RUSTC
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# A target folder of its own: another compiler's artefacts must not mix with the main build.
# The plugin itself first (the shared library a host loads, without the test-only stand-ins).
"$CARGO" build -p coordgen-backend-cpu --lib --target "$TARGET" --target-dir target/aarch64-cross
so=target/aarch64-cross/$TARGET/debug/libcoordgen_backend_cpu.so
# ELF e_machine 183 = AArch64.
python3 -c 'import sys; h = open(sys.argv[1], "rb").read(20); sys.exit(h[:4] != b"\x7fELF" or int.from_bytes(h[18:20], "little") != 183)' "$so" ||
    { echo "test_aarch64: $so is not an aarch64 shared library" >&2; exit 1; }
out=$("$CARGO" test -p coordgen-backend-cpu --lib --target "$TARGET" --target-dir target/aarch64-cross \
    --no-run --message-format=json-render-diagnostics |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "coordgen_backend_cpu":
        print(m["executable"])')
[ -n "$out" ] || { echo "test_aarch64: no test binary was built" >&2; exit 1; }

# `max` has the dot-product extension (the `sdot` kernel runs), `cortex-a53` (Armv8.0) has not
# (the widening-multiply kernel runs); a test checks that detection agrees.
for cpu in max:1 cortex-a53:0; do
    echo "test_aarch64: CPU backend unit tests on an emulated ${cpu%:*}"
    # Each run is bounded: an emulation problem must fail the run, not hang it.
    COORDGEN_EXPECT_DOTPROD=${cpu#*:} timeout 600 qemu-aarch64 -cpu "${cpu%:*}" "$out"
done

# examples/phone-arm64 on SmolLM2: greedy tokens of the aarch64 build under emulation (both
# CPUs) equal the x86 build's. 15-bit activations: at the default 8 bits the 135M model's
# greedy path flips on the kernels' rounding differences within a few tokens.
echo "test_aarch64: examples/phone-arm64 and examples/android-jni for aarch64"
"$CARGO" build -p coordgen-example-phone-arm64 -p coordgen-example-android-jni --target "$TARGET" --target-dir target/aarch64-cross
cargo build -p coordgen-example-phone-arm64
scripts/fetch_models.sh smollm2 >/dev/null
arm=target/aarch64-cross/$TARGET/debug
jni=$arm/libcoordgen_jni.so
for sym in nativeOpen nativeChat nativeCancel nativeClose nativeVersion; do
    aarch64-linux-gnu-nm -D --defined-only "$jni" | grep -q " T Java_dev_coordgen_CoordGen_$sym$" ||
        { echo "test_aarch64: $jni does not export Java_dev_coordgen_CoordGen_$sym" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model="${COORDGEN_MODELS:-$PWD/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
config() { # plugins.toml for the CPU plugin in $1
    printf 'target_backend = "cpu"\n[[plugin]]\nname = "cpu"\nkind = "backend"\nlibrary = "%s/libcoordgen_backend_cpu.so"\n[plugin.options]\nactivation_bits = 15\n' "$1"
}
config "$PWD/$arm" > "$work/arm.toml"
config "$PWD/target/debug" > "$work/x86.toml"
tokens() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["tokens"])'; }
for prompt in "The capital of France is" "def fibonacci(n):"; do
    want=$(COORDGEN_CONFIG="$work/x86.toml" target/debug/phone-generate "$model" "$prompt" --max-tokens 16 --threads 2 2>&1 >/dev/null | tokens)
    for cpu in max cortex-a53; do
        got=$(COORDGEN_CONFIG="$work/arm.toml" timeout 600 qemu-aarch64 -cpu "$cpu" "$arm/phone-generate" "$model" "$prompt" --max-tokens 16 --threads 2 2>&1 >/dev/null | tokens)
        if [ "$got" != "$want" ]; then
            echo "test_aarch64: phone-generate on $cpu gave $got for \"$prompt\", the x86 build $want" >&2
            exit 1
        fi
    done
    echo "test_aarch64: phone-generate, \"$prompt\": the same 16 tokens on x86 and on both emulated cores"
done
