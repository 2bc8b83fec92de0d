#!/usr/bin/env bash
# Install everything (examples/setup_env.sh, each step skipped when done) and run the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k pruning`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$repo/examples/setup_env.sh" | tail -n 1)
cd "$repo"
exec "$python" -m pytest tests -q -p no:cacheprovider "$@"
