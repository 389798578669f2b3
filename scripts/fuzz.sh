#!/usr/bin/env bash
# Fuzzes one of CoordGen's parsers with libFuzzer on the stable toolchain:
#   scripts/fuzz.sh TARGET [SECONDS] [-- LIBFUZZER_FLAGS...]
#   scripts/fuzz.sh list
# TARGET is one of `coordgen::fuzz_targets::TARGETS`. The seeds are fuzz/corpus/TARGET
# (committed); what the fuzzer adds goes to fuzz/work/TARGET, and a crashing, hanging or
# memory-hungry input to fuzz/artifacts/TARGET: copy it into fuzz/regressions/TARGET so that
# CI replays it (tests/fuzz_regressions.rs). Not part of CI: it runs for as long as asked.
#
# Why libFuzzer through the libfuzzer-sys crate, built with plain cargo: the coverage
# instrumentation is rustc's stable -C flags (sanitizer-coverage), so nothing needs nightly
# (cargo-fuzz would, for its sanitizers; Rust's memory safety leaves panics, hangs and
# unbounded allocations to find, which libFuzzer reports without a sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(gguf gguf_tokenizer safetensors chat_template plugins_toml workload replay_trace datastore ngram_cache server_request)
if [[ $# -lt 1 || "$1" == "list" ]]; then
  printf '%s\n' "${TARGETS[@]}"
  exit 0
fi
TARGET=$1
SECONDS_=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
[[ "${1:-}" == "--" ]] && shift
if [[ ! " ${TARGETS[*]} " == *" $TARGET "* ]]; then
  echo "unknown fuzz target '$TARGET' (one of: ${TARGETS[*]})" >&2
  exit 2
fi
HOST=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# --target keeps the instrumentation off build scripts and proc macros. COORDGEN_FUZZ_NO_BUILD=1
# reuses the last build (to fuzz several targets while the sources change).
if [[ "${COORDGEN_FUZZ_NO_BUILD:-0}" != 1 ]]; then
  (cd fuzz && cargo build --release --target "$HOST" --bin fuzz)
fi
BIN=$ROOT/fuzz/target/$HOST/release/fuzz
mkdir -p "fuzz/work/$TARGET" "fuzz/artifacts/$TARGET"
DICT=()
[[ -f "fuzz/dict/$TARGET.dict" ]] && DICT=(-dict="fuzz/dict/$TARGET.dict")
export COORDGEN_FUZZ_TARGET=$TARGET
# Limits: an input slower than 10 s is a hang, more than 2 GiB of memory is an unbounded
# allocation; both are reported with the input that caused them.
exec "$BIN" "fuzz/work/$TARGET" "fuzz/corpus/$TARGET" "${DICT[@]}" \
  -max_total_time="$SECONDS_" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
  -max_len=262144 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$TARGET/" "$@"
