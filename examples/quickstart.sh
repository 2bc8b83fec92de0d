#!/usr/bin/env bash
# The main job on the embedded default: set everything up (examples/setup_env.sh, each step skipped when done),
# then run the whole DPHuBERT pipeline on real speech with a small teacher, and write a report.
# Usage: bash examples/quickstart.sh [OUT] [OPTIONS]   (default ./dphubert_quickstart; every output lands
# there; OPTIONS go to `python -m examples.quickstart`, e.g. --teacher wavlm)
# The quickstart is an example of this checkout (examples/quickstart/), not part of the installed plugin:
# it runs as `python -m examples.quickstart` with the checkout first on PYTHONPATH.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-dphubert_quickstart}
shift $(( $# > 0 ? 1 : 0 ))
python=$(bash "$repo/examples/setup_env.sh" | tail -n 1)
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m examples.quickstart --out "$out" "$@"
