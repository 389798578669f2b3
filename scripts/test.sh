#!/usr/bin/env bash
# The project's test command (CI runs exactly this through .ci/run).
# Fetches the three small real models if absent, builds the workspace once (dev profile,
# optimised; the Vulkan backend's shaders need glslc, which scripts/install_vulkan.sh
# installs with lavapipe so its tests run without a GPU; the openai Python client goes into
# target/pyenv for the server's tests), runs every test, then builds the CPU backend for aarch64 and runs its tests
# under emulation (scripts/test_aarch64.sh; COORDGEN_SKIP_AARCH64=1 skips that part).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh smollm2
scripts/fetch_models.sh qwen-0.5b
scripts/fetch_models.sh gemma3-270m
scripts/install_vulkan.sh
# The server's client test talks to it with the official openai Python package.
COORDGEN_PYTHON="$(scripts/install_openai_client.sh)"
export COORDGEN_PYTHON COORDGEN_REQUIRE_OPENAI=1
cargo build --workspace --all-targets
cargo test --workspace
if [ "${COORDGEN_SKIP_AARCH64:-0}" = 1 ]; then
    echo "test.sh: COORDGEN_SKIP_AARCH64=1: the aarch64 build and tests were skipped" >&2
else
    scripts/test_aarch64.sh
fi
