#!/usr/bin/env bash
# Installs the official `openai` Python client into a virtual environment outside git
# (default target/pyenv; COORDGEN_PYENV overrides), for the server's client tests. Needs
# python3 with venv (Debian's python3-venv is installed with apt when missing and we are
# root) and the Python package index. Prints the environment's python path.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${COORDGEN_PYENV:-target/pyenv}"
# An absolute path: the tests run from their own crate's directory.
case "$env_dir" in /*) ;; *) env_dir="$PWD/$env_dir" ;; esac
py="$env_dir/bin/python"
if [ -x "$py" ] && "$py" -c 'import openai' 2>/dev/null; then
    echo "$py"
    exit 0
fi
rm -rf "$env_dir"
# Debian's python3 lacks venv's pip bootstrap until python3-venv is installed.
if ! python3 -m venv "$env_dir" >/dev/null 2>&1; then
    rm -rf "$env_dir"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "install_openai_client: installing python3-venv (Debian)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
        python3 -m venv "$env_dir" >&2
    else
        echo "install_openai_client: python3 with a working venv module is needed (Debian: apt install python3-venv)" >&2
        exit 1
    fi
fi
# Two tries: a passing index hiccup should not fail the test run.
for try in 1 2; do
    if "$env_dir/bin/pip" install -q --disable-pip-version-check 'openai>=1,<4' >&2; then
        break
    fi
    [ "$try" = 2 ] && { echo "install_openai_client: pip could not install openai" >&2; exit 1; }
    sleep 10
done
"$py" -c 'import openai' >&2
echo "$py"
