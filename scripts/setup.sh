#!/usr/bin/env bash
# Set up fluxnb on a fresh machine: PyTorch if missing, the requirements, and fluxnb itself (editable).
# Used by README's two commands and by CI. Colab users run colab_setup.sh instead (it keeps Colab's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is the release fluxnb is tested with. On a machine without CUDA pick the CPU build of your
  # platform (see pytorch.org); on a GPU machine the default wheel brings CUDA.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -r requirements-dev.txt
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import fluxnb, torch; print(f'fluxnb {fluxnb.__version__} ready (torch {torch.__version__})')"
