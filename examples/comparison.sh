#!/usr/bin/env bash
# DPHuBERT against its baselines at one parameter count (examples/comparison/): set everything up
# (examples/setup_env.sh, each step skipped when done), then run the comparison and write its report.
# Usage: bash examples/comparison.sh [OUT] [OPTIONS]   (default OUT ./dphubert_comparison; OPTIONS go to
# `python -m examples.comparison`, e.g. --size long --kinds dphubert uniform --seeds 1)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-dphubert_comparison}
shift $(( $# > 0 ? 1 : 0 ))
python=$(bash "$repo/examples/setup_env.sh" | tail -n 1)
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m examples.comparison --out "$out" "$@"
