#!/usr/bin/env bash
# The project's test command (CI runs exactly this through .ci/run).
# Fetches the two small real models if absent, builds the workspace once (dev profile,
# optimised), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh smollm2
scripts/fetch_models.sh qwen-0.5b
cargo build --workspace --all-targets
cargo test --workspace
