"""The work in one training step, counted: FLUX.1-dev's matmul FLOPs per sample by kind (the Linear layers, which
FP8 can take, and attention, which stays 16-bit), and a plan's FLOPs per optimizer step. The floors in
BENCHMARKS.md (achieved TFLOP/s, and the time at the GPU's matrix rates) come from here. The count needs no GPU: the
full-size transformer runs on the meta device under torch's FlopCounterMode, nothing is allocated. `--rates`
(CUDA) times the bare kernels.

    python benchmarks/step_flops.py --out /tmp/step-flops.json                # the count (any machine)
    python benchmarks/step_flops.py --rates --commit SHA --out DIR/...json    # on a GPU: and the bare kernels' TFLOP/s

Per sample: the forward, and the backward a LoRA step runs (the base is frozen, so only input gradients: one matmul
per Linear where a full fine-tune has two), each split into Linear (aten.addmm / mm) and attention (aten.bmm: the
math path's QK^T and PV; FlopCounterMode counts a fused kernel the same). A block whose activations are not kept
runs its forward again in the backward, so a step of S samples with R of the 57 blocks recomputed is
S x (forward + backward + R x the block's forward). Only matmuls are counted: norms, activations, RoPE, LoRA's rank-r
products, quantization and the optimizer are left out. But fluxnb's compiled blocks recompute less than their whole
forward (only what the backward needs), so the count is an upper bound of the matmul work, and a floor taken from
it is not a strict lower bound of time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fullsize  # noqa: E402
import train_step  # noqa: E402
from fp8_step import _timed  # noqa: E402

# width, height, text tokens: benchmarks/train_step.py's cases (their dtypes aside)
SIZES = {f"{w}x{h}": (w, h, text) for w, h, text, _dtype in train_step.CASES.values()}
BLOCKS = 19 + 38  # FLUX.1-dev's double- and single-stream blocks
LINEAR, ATTENTION = ("addmm", "mm"), ("bmm",)


def _kinds(counts: dict) -> dict[str, float]:
    """TFLOP by kind from one FlopCounterMode table ({op: flops})."""
    out = {"linear": 0.0, "attention": 0.0}
    for op, flops in counts.items():
        name = str(op).split(".")[-1]
        kind = "linear" if name in LINEAR else "attention" if name in ATTENTION else None
        if kind is None:
            raise ValueError(f"an op FlopCounterMode counted that this script does not sort: {op}")
        out[kind] += flops / 1e12
    return out


def count(width: int, height: int, text: int, config: dict | None = None) -> dict:
    """TFLOP per sample at this size: forward and LoRA backward by kind, and one block's forward (double and single
    blocks differ by under 0.1%: the single block's figure is used for every recomputed block). `config`: the
    transformer's (default FLUX.1-dev's)."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = config or fullsize.FLUX_DEV_TRANSFORMER
    model = fullsize._empty(FluxTransformer2DModel, config, "meta", torch.bfloat16)
    model.requires_grad_(False)  # frozen base: the backward computes input gradients only
    inputs = fullsize.transformer_inputs(width, height, text, config=config)
    inputs["hidden_states"].requires_grad_()  # the backward runs as far as the first layer's input
    with FlopCounterMode(display=False) as forward:
        out = model(**inputs).sample
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    block = next(v for k, v in forward.get_flop_counts().items() if k.endswith("single_transformer_blocks.0"))
    return {"tokens": inputs["hidden_states"].shape[1] + text, "forward": _kinds(forward.get_flop_counts()["Global"]),
            "backward": _kinds(backward.get_flop_counts()["Global"]), "block_forward": _kinds(block)}


def step_tflop(counted: dict, samples: int, recomputed: int) -> dict[str, float]:
    """TFLOP of one optimizer step of `samples` samples with `recomputed` of the 57 blocks run twice, by kind."""
    return {kind: samples * (counted["forward"][kind] + counted["backward"][kind]
                             + recomputed * counted["block_forward"][kind])
            for kind in ("linear", "attention")}


def floor_s(tflop: dict[str, float], linear_rate: float, attention_rate: float) -> float:
    """Seconds at the given matrix rates (TFLOP/s): the Linear layers at `linear_rate` (FP8's, or bf16's), attention
    at `attention_rate` (bf16's)."""
    return tflop["linear"] / linear_rate + tflop["attention"] / attention_rate


# FLUX.1-dev's Linear shapes (K in, N out) that carry the work, for M = 4 x 1613 tokens (a 512x768 step at batch 4):
# the attention projections, MLP up, MLP down, the single block's proj_out; the backward's input gradient runs each
# as (M, N) x (N, K).
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]


def rates(m: int = 4 * 1613) -> list[dict]:
    """TFLOP/s of the bare matmul kernels at the step's shapes on this GPU, each Linear's forward (x W^T) and input
    gradient (g W) in the layouts fluxnb runs them: bf16 (cuBLAS), and FP8 e4m3 with one scale per row and per
    column (torch._scaled_mm, as fluxnb.model.fp8 calls it: the backward's codes transposed into a copy), fast and
    exact accumulation. No quantization is timed: what the kernels give, against which fluxnb's layer can be read."""
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w8 = w.to(torch.float8_e4m3fn)
        for pass_, rows_in, weight, weight8 in (("forward", k, w.t(), w8.t()),
                                                ("input gradient", n, w, w8.t().contiguous().t())):
            a = torch.randn(m, rows_in, device="cuda", dtype=torch.bfloat16)
            a8 = a.to(torch.float8_e4m3fn)
            sa = torch.ones(m, 1, device="cuda")
            sw = torch.ones(1, weight.shape[1], device="cuda")
            flop = 2 * m * k * n / 1e12
            row = {"pass": pass_, "m": m, "k": k, "n": n, "bf16": flop / _timed(lambda: a @ weight, warmup=10)}
            # (10 warm-up calls: the clocks ramp up from an idle GPU; the median of 20 timed ones, fp8_step's way)
            for fast in (True, False):
                seconds = _timed(lambda: torch._scaled_mm(a8, weight8, scale_a=sa, scale_b=sw,
                                                          out_dtype=torch.bfloat16, use_fast_accum=fast), warmup=10)
                row["fp8_fast" if fast else "fp8_exact"] = flop / seconds
            rows.append({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rates", action="store_true", help="also time the bare matmul kernels (CUDA)")
    parser.add_argument("--commit", default="", help="the commit of the code (default: git's HEAD here)")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip()
    report = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "torch": torch.__version__, "unit": "TFLOP per sample",
              "sizes": {name: count(*size) for name, size in SIZES.items()}}
    if args.rates:
        report |= {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "rates_tflops": rates()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
