#!/usr/bin/env bash
# The whole test suite: every package against the newest transformers release the package
# registry serves now and the oldest supported one, plus lint and the type check (mypy.ini).
# scripts/transformers_releases.py names both releases. Environments live in .venvs/ and are reused (upgraded when a release ships).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
status=0
python="${PYTHON:-python3}"
newest="$("$python" "$root/scripts/transformers_releases.py" newest)"
oldest="$("$python" "$root/scripts/transformers_releases.py" oldest)"
echo "=== transformers releases under test: newest $newest, oldest $oldest"
for entry in "latest:$newest" "oldest:$oldest"; do
    name="${entry%%:*}"; version="${entry#*:}"
    venv="$root/.venvs/$name"
    "$root/scripts/setup.sh" "$venv" "$version"
    echo "=== tests with transformers $version ($name)"
    HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:randomly core/tests plugins tests || status=1
done
echo "=== lint"
"$root/.venvs/latest/bin/ruff" check . || status=1
echo "=== type check"
"$root/.venvs/latest/bin/mypy" || status=1
exit $status
