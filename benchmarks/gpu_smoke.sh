#!/usr/bin/env bash
# The whole series headless on CUDA, with the tiny model standing in for FLUX.1-dev: exercises the real GPU
# code paths (diffusers BitsAndBytesConfig NF4, 8-bit T5, bf16 autocast, GPU sampling, torch.compile of the blocks,
# block offload on a CUDA stream, batches of 2) that CI's CPU cannot.
#   bash benchmarks/gpu_smoke.sh [WORK_DIR] [DTYPE]
# DTYPE defaults to fp32: the tiny model's random 32-wide attention gives non-finite gradients in bf16 on CUDA
# (seen on an H100, 2026-11-22, in SDPA/RMSNorm backward of its last block); the full-size FLUX.1-dev transformer
# trains with finite gradients in bf16 (benchmarks/train_step.py records them), so this is the toy's, not the path's.
set -euo pipefail
W=${1:-/tmp/fluxnb-smoke}
DTYPE=${2:-fp32}
rm -rf "$W"
export FLUXNB_PROFILE=real HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 MPLBACKEND=Agg
python3 -m fluxnb tiny --out "$W/tiny"
python3 -c "from fluxnb.runs import open_run; r = open_run('$W/run', verbose=False)
r.config = r.config.replace(model={'dtype': '$DTYPE', 'quantization': 'nf4', 'offload_blocks': 2},
                           train={'batch_size': 2, 'gradient_accumulation_steps': 2}); r.save()"
python3 -m fluxnb embed --run-dir "$W/run" --model "$W/tiny/model" --dataset "$W/tiny/dataset" --width 64 --height 96
python3 -m fluxnb latents --run-dir "$W/run"
python3 -m fluxnb train --run-dir "$W/run" --max-steps 12
python3 -m fluxnb export --run-dir "$W/run" --format comfyui
HF_TOKEN=hf_fakeSmokeToken0000000000000000000 python3 -m fluxnb push --run-dir "$W/run" --repo-id you/smoke --dry-run
! grep -r "hf_fakeSmokeToken" "$W/run" >/dev/null
echo "gpu_smoke: OK ($(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'))"
