#!/usr/bin/env bash
# The whole test suite: every package against the newest transformers and the oldest
# supported one (5.3.0), plus lint. Environments live in .venvs/ and are reused.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
status=0
for entry in "latest:5.24.0" "oldest:5.3.0"; do
    name="${entry%%:*}"; version="${entry#*:}"
    venv="$root/.venvs/$name"
    "$root/scripts/setup.sh" "$venv" "$version"
    echo "=== tests with transformers $version ($name)"
    HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:randomly core/tests plugins tests || status=1
done
echo "=== lint"
"$root/.venvs/latest/bin/ruff" check . || status=1
exit $status
