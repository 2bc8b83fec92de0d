#!/usr/bin/env bash
# The paper's recipe with a HuBERT Base teacher on LibriSpeech 960 h, 4 GPUs, from the repository root:
#   bash examples/recipe_hubert_base.sh MANIFEST_DIR hubert_base_ls960.pt OUT
# MANIFEST_DIR holds train.tsv / valid.tsv (fairseq's examples/wav2vec/wav2vec_manifest.py writes them).
set -euo pipefail
data=$(realpath "$1"); teacher=$(realpath "$2"); out=$(realpath -m "$3")
shift 3  # anything else is passed to both stages, e.g. distributed_training.distributed_world_size=8
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fairseq-hydra-train --config-dir configs --config-name dphubert \
  task.data="$data" task.teacher_path="$teacher" checkpoint.save_dir="$out/stage1" "$@"
dphubert-export "$out/stage1/checkpoint_last.pt" "$out/stage1_pruned.pt" --json "$out/stage1_pruned.json"

fairseq-hydra-train --config-dir configs --config-name dphubert_final \
  task.data="$data" task.teacher_path="$teacher" task.student_path="$out/stage1_pruned.pt" \
  checkpoint.save_dir="$out/stage2" "$@"
dphubert-export "$out/stage2/checkpoint_last.pt" "$out/dphubert.pt" --json "$out/dphubert.json"
