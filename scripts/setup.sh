#!/usr/bin/env bash
# Set up fluxnb on a fresh machine: PyTorch if missing, the requirements, and fluxnb itself (editable).
# Used by README's two commands and by CI. Colab users run colab_setup.sh instead (it keeps Colab's torch).
# On a GPU workstation, install the CUDA build of torch first (README, "On your own machine"); it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"  # the release fluxnb is tested with
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ "$(uname -s)" = Linux ] && ! nvidia-smi -L >/dev/null 2>&1; then
    # No CUDA GPU on Linux: the CPU build from PyTorch's CPU index (about 200 MB, not the default wheel's
    # several GB of CUDA libraries). Where that index cannot be reached (a PyPI-only mirror, a firewall), give
    # up on it after a few seconds and take torch from the default index.
    "$PY" -m pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu "$TORCH" \
      || { echo "setup: PyTorch's CPU index is out of reach; installing $TORCH from the default index" >&2
           "$PY" -m pip install -q "$TORCH"; }
  else
    # A CUDA GPU on Linux (the default wheel brings CUDA), or macOS (the default wheel is the CPU/MPS build).
    "$PY" -m pip install -q "$TORCH"
  fi
fi
# constraints.txt: the versions the tests last passed with, so a newer release cannot break a first run unseen.
"$PY" -m pip install -q -r requirements-dev.txt -c constraints.txt
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import fluxnb, torch; print(f'fluxnb {fluxnb.__version__} ready (torch {torch.__version__})')"
