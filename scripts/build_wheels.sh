#!/usr/bin/env bash
# Build a wheel of every distribution in the monorepo into one folder.
#
# Usage: scripts/build_wheels.sh [OUTDIR]        (OUTDIR defaults to dist/ at the repo root)
#
# Uses the current python ($PYTHON if set, else `python`, else `python3`) with
# `python -m build --wheel --no-isolation`, so `build` and `hatchling` must already be
# installed in that environment. Distributions: core/, plugins/*/, packages/*/ (every folder
# holding a pyproject.toml). Exits non-zero if any build fails; prints the wheel file names.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo_root/dist}"

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    py=python
else
    py=python3
fi

if ! "$py" -c 'import build, hatchling' >/dev/null 2>&1; then
    echo "error: '$py' cannot import 'build' and 'hatchling'; run: $py -m pip install build hatchling" >&2
    exit 2
fi

mkdir -p "$outdir" || exit 2
outdir="$(cd "$outdir" && pwd)"

dists=()
for dir in "$repo_root"/core "$repo_root"/plugins/*/ "$repo_root"/packages/*/; do
    dir="${dir%/}"
    [[ -f "$dir/pyproject.toml" ]] && dists+=("$dir")
done
if [[ ${#dists[@]} -eq 0 ]]; then
    echo "error: no distributions found under $repo_root" >&2
    exit 2
fi

# Each distribution builds into its own scratch folder so the names printed are exactly the
# wheels built now, whatever OUTDIR already held.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

failed=()
built=()
for dir in "${dists[@]}"; do
    rel="${dir#"$repo_root"/}"
    tmp="$scratch/${rel//\//_}"
    mkdir -p "$tmp"
    echo ">>> building wheel: $rel" >&2
    if ! "$py" -m build --wheel --no-isolation --outdir "$tmp" "$dir" >"$tmp.log" 2>&1; then
        echo "!!! build failed: $rel" >&2
        cat "$tmp.log" >&2
        failed+=("$rel")
        continue
    fi
    for whl in "$tmp"/*.whl; do
        [[ -e "$whl" ]] || { echo "!!! no wheel produced: $rel" >&2; failed+=("$rel"); continue; }
        mv -f "$whl" "$outdir/"
        built+=("$(basename "$whl")")
    done
done

echo "wheels in $outdir:" >&2
for name in "${built[@]}"; do
    echo "$name"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "error: ${#failed[@]} distribution(s) failed to build: ${failed[*]}" >&2
    exit 1
fi
