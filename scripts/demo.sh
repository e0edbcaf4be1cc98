#!/usr/bin/env bash
# Set up .venv (first run only takes a while) and run the main job: `defuser demo`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" "$root/.venv" >/dev/null
exec "$root/.venv/bin/defuser" demo "$@"
