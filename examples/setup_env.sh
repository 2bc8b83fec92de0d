#!/usr/bin/env bash
# Prepare everything this project needs on a fresh Debian/Ubuntu-like machine with Python 3.11, skipping each
# step that is already done:
#   - Debian packages with real speech and a speech synthesiser (pocketsphinx-testdata, espeak-ng), when apt
#     is available and we are root;
#   - a virtual environment (default ~/.venvs/dphubert-fairseq, or $DPHUBERT_VENV) with the tested pin set
#     (setup.py's "tested" extra: torch 2.9.1 + torchaudio 2.9.1, ve-fairseq 0.12.3), pytest, the
#     quickstart's matplotlib and scikit-learn, hydra's submitit launcher (the "slurm" extra), s3prl for
#     SUPERB and WavLM's own code in the tests (the "superb" extra), onnx and onnxruntime (the "onnx" extra);
#   - this checkout installed into it in editable mode.
# Source it to get $DPHUBERT_PYTHON, or run it; it prints the venv's python on its last line.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DPHUBERT_VENV:-$HOME/.venvs/dphubert-fairseq}
python=${PYTHON:-python3}

log() { echo "[setup] $*" >&2; }

# --- Debian packages (optional: tests that need real speech skip without them) ---
missing=()
for pkg in pocketsphinx-testdata espeak-ng; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
      || log "apt-get failed; going on without ${missing[*]}"
  else
    log "not installing ${missing[*]} (needs apt-get as root); tests on real speech will be skipped"
  fi
fi

# --- virtual environment with the tested dependencies ---
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.dphubert-deps"
want=$(sha256sum "$repo/setup.py" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing dependencies (torch/torchaudio are several GB the first time)"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
  "$venv/bin/python" -m pip install -q -e "$repo[tested,test,quickstart,slurm,superb,onnx]" >&2
  echo "$want" > "$stamp"
else
  # dependencies are in place: only point the editable install at this checkout
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
fi
"$venv/bin/python" -c "import torch, torchaudio, fairseq, dphubert_fairseq" 2>/dev/null \
  || { log "the environment in $venv does not import; remove it and run again"; exit 1; }

export DPHUBERT_PYTHON="$venv/bin/python"
echo "$DPHUBERT_PYTHON"
