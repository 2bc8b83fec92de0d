#!/bin/bash
# The benchmarks on a GPU machine, as one prepared run, from the project root:
#   bash benchmarks/gpu_check.sh [WHEELS]
# WHEELS: a folder of prebuilt wheels of the tested pins for that machine's Python (made where there is network,
# e.g. `pip download --no-deps -d WHEELS ve-fairseq==0.12.3 hydra-core==1.3.2 omegaconf==2.3.0 ...`), installed
# first into a temporary folder for a machine without network; without it the environment's packages are used.
# Tables, logs and JSON land in $OUT (default benchmarks/results), and all of them also in one archive,
# $GPU_CHECK_PACK (default $OUT/results.tgz), rewritten every 20 s while the run goes on (for machines that send
# back only a few files, or cut a run short).
# GPU_CHECK_SECONDS (default 570): the whole run's budget; each step gets at most what is left of it, so a
# slow step costs the steps after it, never the results before it. A step that fails or runs out of time is
# recorded in steps.txt (exit status and seconds) and the run goes on. GPU_CHECK_ONLY="NAME ...": only these
# steps (the names below, as in steps.txt).
# Steps, in order: the suite's CUDA-only tests, a Base-shaped stage-1 update against stock HuBERT pretraining
# (AMP, 16 x 10 s), inference (8 x 10 s, fp16), the stage-1 update at the active sets recorded along a run
# (shrinking_update.py), stage 1 with two workers through fairseq's distributed start (distributed_check.py),
# the GPU's latency table (dphubert-profile at 8 x 10 s in fp16) and what it predicts for the recorded
# structures (inference.py --latency-table), and the length scaling (8 items of 2 and 16 s). Alongside them, on two physical cores kept free of the GPU
# steps, when the CPU has AMX or AVX512: the CPU table of "skipping is never slower than computing"
# (shrinking_update.py --paired) at 2 threads. On an H200 the steps took 25, 81, 29, 132, 88 and 84 s (about
# 7.5 minutes with the install), the CPU table 297 s alongside.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
WHEELS=${1:-}
BUDGET=${GPU_CHECK_SECONDS:-570}
PACK=${GPU_CHECK_PACK:-$OUT/results.tgz}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: $WHEELS: no such folder of wheels" >&2; exit 2; }
  S=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=$S:$PWD
fi
export PYTHONUNBUFFERED=1

pack() {  # every result so far into results.tgz, replaced whole
  tar czf "$PACK.part" --exclude="$(basename "$PACK")*" -C "$OUT" . 2>/dev/null && mv -f "$PACK.part" "$PACK"
}
(while sleep 20; do pack; done) &
PACKER=$!

step() {  # step NAME SECONDS COMMAND...: stdout to NAME.txt, stderr to NAME.err, never stops the run
  local name=$1 limit=$2 left t0 rc
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    return
  fi
  left=$((BUDGET - (SECONDS - START) - 10))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "$name: not run (budget spent)" | tee -a "$OUT/steps.txt"
    return
  fi
  t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket"
  python3 -c "import sys, torch, numpy; print(sys.version.split()[0], torch.__version__, torch.version.cuda, numpy.__version__)"
  python3 -c "import fairseq, dphubert_fairseq; print('fairseq', fairseq.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Two physical cores for the CPU table, and every CPU outside their cores for the GPU steps.
read -r CPU_SET GPU_SET < <(python3 - <<'EOF'
import os
cpus = sorted(os.sched_getaffinity(0))
def siblings(c):
    text = open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read().strip()
    out = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out
chosen, taken = [], set()
for c in cpus:
    if c not in taken and len(chosen) < 2:
        chosen.append(c)
        taken |= siblings(c)
rest = [c for c in cpus if c not in taken]
print(",".join(map(str, chosen)), ",".join(map(str, rest or cpus)))
EOF
)
echo "CPU table on CPUs $CPU_SET, GPU steps on CPUs $GPU_SET" | tee -a "$OUT/env.txt"
CPU_PID=
if grep -qE "amx_tile|avx512f" /proc/cpuinfo; then
  # "never slower than computing": each state against itself with every unit masked, in one process
  # (the GPU hidden from it: nothing of the CPU table may run there)
  CUDA_VISIBLE_DEVICES= step cpu_shrinking_paired "$BUDGET" taskset -c "$CPU_SET" python3 benchmarks/shrinking_update.py --threads 2 \
    --at 67 268 --paired 2 --warmup 1 --repeat 3 --json "$OUT/cpu_shrinking_paired.json" &
  CPU_PID=$!
fi
G="taskset -c $GPU_SET"

# the suite's CUDA-only cases (skipped on a CPU): an adam state resumed by the fused kernel on the GPU, the
# device's random stream untouched by the gather/mask measurement
step cuda_tests 90 $G python3 -m pytest -q -p no:cacheprovider tests/test_torch_adamw.py \
  tests/test_inactive_units.py -k cuda -rs
step training_step_gpu 120 $G python3 benchmarks/training_step.py --device cuda --json "$OUT/training_step_gpu.json"
step inference_gpu 60 $G python3 benchmarks/inference.py --device cuda --json "$OUT/inference_gpu.json"
step shrinking_update_gpu 150 $G python3 benchmarks/shrinking_update.py --device cuda \
  --json "$OUT/shrinking_update_gpu.json"
step distributed_gpu 180 $G python3 benchmarks/distributed_check.py --device cuda --out "$(mktemp -d)" \
  --json "$OUT/distributed_gpu.json"
# the latency table of this GPU, timed as inference.py runs (8 x 10 s, fp16), on a random HuBERT Base teacher;
# then what it predicts for the recorded structures against their measured times
profile_gpu() {
  local work
  work=$(mktemp -d)
  python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import harness
harness.random_teacher_in(sys.argv[1], harness.SHAPES["base"])' "$work" || return
  python3 -m dphubert_fairseq.latency_profile --teacher "$work/teacher.pt" --device cuda --batch 8 \
    --dtype float16 --out "$OUT/latency_table_gpu.json" || return
  python3 benchmarks/inference.py --device cuda --latency-table "$OUT/latency_table_gpu.json" \
    --json "$OUT/inference_latency_gpu.json"
}
export -f profile_gpu
export OUT
step latency_profile_gpu 150 $G bash -c profile_gpu
step scaling_gpu 120 $G python3 benchmarks/training_step.py --device cuda --batch 8 --seconds 2 16 --repeat 10 \
  --no-fairseq-adam --json "$OUT/scaling_gpu.json"
[ -n "$CPU_PID" ] && wait "$CPU_PID"
kill "$PACKER" 2>/dev/null
pack
cat "$OUT/steps.txt"
