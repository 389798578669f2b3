#!/usr/bin/env bash
# The main job on the default models: fetch them if absent, build, and ask the 1.5B coder
# model to edit a file given in the prompt (a context-heavy generation), printing the speed
# summary. Usage: scripts/demo.sh [extra coordgen generate flags]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh qwen-1.5b
cargo build --workspace --release
FILE=runtime/host/src/sampling.rs
PROMPT="$(printf 'Here is a Rust file:\n\n```rust\n%s\n```\n\nAdd a doc comment to every public function that lacks one and show the complete updated file.' "$(cat "$FILE")")"
exec target/release/coordgen generate --model qwen-1.5b --chat --max-tokens 256 --prompt "$PROMPT" "$@"
