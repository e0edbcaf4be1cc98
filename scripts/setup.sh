#!/usr/bin/env bash
# Create (or refresh) a virtual environment with core, every first-party plugin, the
# testkit and the test tools, for one transformers version (default: the newest release the
# package registry serves, see scripts/transformers_releases.py).
#   scripts/setup.sh [VENV_DIR] [TRANSFORMERS_VERSION]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
python="${PYTHON:-python3}"
transformers_version="${2:-$("$python" "$root/scripts/transformers_releases.py" newest)}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: this machine carries the CPU build of 2.13.0; an open range
# would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
# scipy: some model families (inkling) import it when built.
"${pip[@]}" "transformers==$transformers_version" safetensors accelerate \
    pytest hypothesis build hatchling ruff mypy scipy
"${pip[@]}" -e "$root/core" -e "$root/packages/defuser-testkit" \
    $(for plugin in "$root"/plugins/*/; do printf -- '-e %s ' "$plugin"; done)
echo "environment ready: $venv (transformers $transformers_version)"
