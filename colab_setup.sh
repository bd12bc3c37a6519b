#!/usr/bin/env bash
# Install fluxnb on Google Colab (or any machine that already has a CUDA PyTorch) without touching its torch.
# Mounts nothing: notebook 01 has a cell that mounts Google Drive if you want your runs to survive the VM.
#   !curl -fsSL <raw url of this file> | bash        or, in a clone:   !bash colab_setup.sh
set -euo pipefail
REPO=${FLUXNB_REPO:-https://github.com/fluxnb/fluxnb.git}
DEST=${FLUXNB_DEST:-/content/fluxnb}
if [ ! -f "$DEST/requirements.txt" ]; then
  if [ -f requirements.txt ] && [ -d fluxnb ]; then DEST=$PWD; else git clone --depth 1 "$REPO" "$DEST"; fi
fi
cd "$DEST"
python3 -c "import torch" || { echo "PyTorch is missing: install it first (Colab ships it)." >&2; exit 1; }
# torch is deliberately absent from requirements.txt, so Colab's CUDA build stays as it is.
# The tested versions of the libraries fluxnb calls into (constraints.txt); Colab's own torch, numpy and Jupyter
# stack stay as they are.
grep -iE '^(diffusers|transformers|peft|prodigyopt|accelerate|bitsandbytes|datasets|huggingface[-_]hub|safetensors|tokenizers|torchao)==' \
  constraints.txt > /tmp/fluxnb-constraints.txt
python3 -m pip install -q -r requirements.txt -c /tmp/fluxnb-constraints.txt
python3 -m pip install -q --no-deps -e .
python3 -c "import fluxnb, torch; print(f'fluxnb {fluxnb.__version__} installed in $DEST; torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
