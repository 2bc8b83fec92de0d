#!/bin/bash
# The benchmarks on a GPU machine, as one prepared run, from the project root:
#   bash benchmarks/gpu_check.sh [WHEELS]
# WHEELS: a folder of prebuilt wheels of the tested pins for that machine's Python (made where there is network,
# e.g. `pip download --no-deps -d WHEELS torch==2.9.1 torchaudio==2.9.1 ve-fairseq==0.12.3 ...`), installed
# first into a temporary folder for a machine without network; without it the environment's packages are used.
# Tables and JSON land in $OUT (default benchmarks/results).
# About 9 minutes on an H100 (estimated; never run): the suite's CUDA-only tests (their failures are reported in
# cuda_tests.txt and the benchmarks run on), a Base-shaped stage-1 update against stock HuBERT pretraining
# (AMP, 16 x 10 s), inference (8 x 10 s, fp16), the stage-1 update at the active sets recorded along a run
# (shrinking_update.py), the length scaling (8 items of 2 to 16 s), and stage 1 with two workers through
# fairseq's distributed start (c10d, both ranks on the one GPU over gloo): units becoming inactive mid-run, a
# forced AMP overflow, a resume that keeps the loss scale, a wav2vec2 teacher with padded batches.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
WHEELS=${1:-}
mkdir -p "$OUT"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: $WHEELS: no such folder of wheels" >&2; exit 2; }
  S=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" "$WHEELS"/*.whl
  export PYTHONPATH=$S:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# the suite's CUDA-only cases (skipped on a CPU): an adam state resumed by the fused kernel on the GPU, the
# device's random stream untouched by the gather/mask measurement
python3 -m pytest -q -p no:cacheprovider tests/test_torch_adamw.py tests/test_inactive_units.py -k cuda -rs \
  2>&1 | tee "$OUT/cuda_tests.txt" || true
python3 benchmarks/training_step.py --device cuda --json "$OUT/training_step_gpu.json" 2>"$OUT/training_step_gpu.err" \
  | tee "$OUT/training_step_gpu.txt"
python3 benchmarks/inference.py --device cuda --json "$OUT/inference_gpu.json" 2>"$OUT/inference_gpu.err" \
  | tee "$OUT/inference_gpu.txt"
python3 benchmarks/shrinking_update.py --device cuda --json "$OUT/shrinking_update_gpu.json" \
  2>"$OUT/shrinking_update_gpu.err" | tee "$OUT/shrinking_update_gpu.txt"
python3 benchmarks/training_step.py --device cuda --batch 8 --seconds 2 4 8 16 --repeat 10 --no-fairseq-adam \
  --json "$OUT/scaling_gpu.json" 2>"$OUT/scaling_gpu.err" | tee "$OUT/scaling_gpu.txt"
python3 benchmarks/distributed_check.py --device cuda --out "$(mktemp -d)" --json "$OUT/distributed_gpu.json" \
  2>"$OUT/distributed_gpu.err" | tee "$OUT/distributed_gpu.txt"
