#!/usr/bin/env bash
# Install everything (examples/setup_env.sh, each step skipped when done), check the code's format and lint
# (ruff.toml) and run the test suite. Extra arguments go to pytest, e.g. `bash tests/run.sh -k pruning`, or
# `bash tests/run.sh -m 'not slow'` for the fast lane.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$repo/examples/setup_env.sh" | tail -n 1)
cd "$repo"
"$python" -m ruff format --check --quiet . || { echo "format: run ruff format . (ruff.toml)" >&2; exit 1; }
"$python" -m ruff check --quiet .
exec "$python" -m pytest tests -q -p no:cacheprovider "$@"
