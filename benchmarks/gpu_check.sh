#!/bin/bash
# The benchmarks on a GPU machine, as one prepared run, from the project root. A machine without network takes
# the tested pins as wheels in .whl/ (made where there is network, e.g. `pip download --no-deps -d .whl
# torch==2.9.1 torchaudio==2.9.1 ve-fairseq==0.12.3 ...` for that machine's Python; .whl/ is git-ignored);
# tables and JSON land in $OUT (default benchmarks/results).
# About 6 minutes on an H100: a Base-shaped stage-1 update against stock HuBERT pretraining (AMP, 16 x 10 s),
# the length scaling (8 items of 2 to 16 s), and inference (8 x 10 s, fp16).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  S=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .whl/*.whl
  export PYTHONPATH=$S:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/training_step.py --device cuda --json "$OUT/training_step_gpu.json" 2>"$OUT/training_step_gpu.err" \
  | tee "$OUT/training_step_gpu.txt"
python3 benchmarks/inference.py --device cuda --json "$OUT/inference_gpu.json" 2>"$OUT/inference_gpu.err" \
  | tee "$OUT/inference_gpu.txt"
python3 benchmarks/training_step.py --device cuda --batch 8 --seconds 2 4 8 16 --repeat 10 \
  --json "$OUT/scaling_gpu.json" 2>"$OUT/scaling_gpu.err" | tee "$OUT/scaling_gpu.txt"
