"""Seconds per training step and peak GPU memory: the blog's reference recipe vs fluxnb, in ONE run, same inputs.

Runs on the GPU machine (no FLUX download there: benchmarks/fullsize.py builds a random-weight FLUX.1-dev
transformer of the real size, 11.9 B parameters, so time and memory are real; image quality is not).

    python benchmarks/train_step.py                       # all cases -> benchmarks/results/<date>-<device>.json
    python benchmarks/train_step.py --cases nf4-512x768-bf16 --steps 10

Each (implementation, dtype) pair runs in its own process, so one's cached allocations cannot inflate the other's
peak. Per case: batch 1, `--warmup` steps, then `--steps` timed steps (forward + backward + clip + optimizer step,
synchronised), median reported. Peak = torch.cuda.max_memory_allocated during the timed steps, model included.

reference: transcribed from the blog / diffusers' train_dreambooth_lora_flux_miniature.py: BitsAndBytesConfig NF4
  + prepare_model_for_kbit_training + LoRA r4 on to_k/to_q/to_v/to_out.0 + gradient checkpointing + fp32 LoRA
  params + bnb AdamW8bit + accelerate autocast; the step is tests/reference_step.py (the script's own lines).
fluxnb: fluxnb.quant.load_transformer + fluxnb.lora.add_lora + fluxnb.step.training_step + the same optimizer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# name: (width, height, text tokens, dtype)
CASES = {
    "nf4-512x768-bf16": (512, 768, 77, "bf16"),
    "nf4-1024x1024-bf16": (1024, 1024, 512, "bf16"),
    "nf4-512x768-fp16": (512, 768, 77, "fp16"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLUX_VAE = SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611, block_out_channels=[128, 256, 512, 512])
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
GiB = 2**30


def make_inputs(width: int, height: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the caches hold for one sample: VAE posterior (mean, std) and the T5/CLIP embeddings. On the GPU."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    cpu = {"latent_mean": torch.randn(1, 16, h, w, generator=g), "latent_std": 0.05 * torch.rand(1, 16, h, w, generator=g),
           "prompt_embeds": torch.randn(1, tokens, 4096, generator=g), "pooled_prompt_embeds": torch.randn(1, 768, generator=g),
           "text_ids": torch.zeros(tokens, 3)}
    return {k: v.cuda() for k, v in cpu.items()}


def reference_setup(ckpt: Path, dtype: torch.dtype):
    """The blog's code, in its order (section 'Setting up 4-bit Quantization' and 'Defining LoRA Configuration')."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, prepare_model_for_kbit_training

    nf4_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    transformer = FluxTransformer2DModel.from_pretrained(ckpt, subfolder="transformer", quantization_config=nf4_config,
                                                         torch_dtype=dtype)
    transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    transformer.enable_gradient_checkpointing()
    cast_training_params([transformer], dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    return transformer, optimizer, params


def reference_step(transformer, batch, scheduler, dtype):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from reference_step import reference_loss

    logvar = 2 * torch.log(batch["latent_std"])
    dist = DiagonalGaussianDistribution(torch.cat([batch["latent_mean"], logvar], dim=1))
    args = SimpleNamespace(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, guidance_scale=1.0)
    return reference_loss(transformer, scheduler, dist, batch, args, FLUX_VAE, weight_dtype=dtype,
                          device=torch.device("cuda"))


def fluxnb_setup(ckpt: Path, dtype: torch.dtype, double_quant: bool):
    from fluxnb import lora
    from fluxnb.config import LoRAConfig, ModelConfig, TrainConfig
    from fluxnb.hardware import Hardware, cuda_info
    from fluxnb.quant import load_transformer
    from fluxnb.step import make_optimizer

    hw = Hardware("real", torch.device("cuda"), dtype, cuda_info(), "benchmark")
    transformer = load_transformer(ModelConfig(model_id=str(ckpt), double_quant=double_quant), hw)
    lora.add_lora(transformer, LoRAConfig(), seed=0)
    transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    return transformer, make_optimizer(params, TrainConfig()), params


def fluxnb_step(transformer, batch, scheduler, dtype, _state={}):  # noqa: B006 - built once per process
    from fluxnb import flow
    from fluxnb.config import TrainConfig
    from fluxnb.step import LatentScale, training_step

    if not _state:
        _state |= {"table": flow.NoiseTable.from_scheduler(scheduler), "cfg": TrainConfig(),
                   "latent": LatentScale(FLUX_VAE.shift_factor, FLUX_VAE.scaling_factor, 8),
                   "generator": torch.Generator().manual_seed(0)}
    return training_step(transformer, batch, _state["table"], _state["cfg"], _state["latent"], _state["generator"], dtype)


def worker(impl: str, dtype_name: str, cases: list[str], ckpt: Path, warmup: int, steps: int) -> list[dict]:
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if impl == "reference":
        transformer, optimizer, params = reference_setup(ckpt, dtype)
        step_fn = reference_step
    else:
        transformer, optimizer, params = fluxnb_setup(ckpt, dtype, double_quant="-dq" in impl)
        if "-compile" in impl:  # regional compilation: each of the 57 repeated blocks, not the whole model
            for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                block.compile()
        step_fn = fluxnb_step
    load_s = time.perf_counter() - t0
    accelerator = Accelerator(mixed_precision=dtype_name)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    after_load = torch.cuda.memory_allocated() / GiB
    rows = []
    for name in cases:
        width, height, tokens, _ = CASES[name]
        batch = make_inputs(width, height, tokens)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, losses, grad_norms = [], [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            loss = step_fn(transformer, batch, scheduler, dtype)
            accelerator.backward(loss)
            grad_norms.append(float(accelerator.clip_grad_norm_(params, 1.0)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronises
            if i >= warmup:
                times.append(time.perf_counter() - start)
        rows.append({"case": name, "impl": impl, "s_per_step": statistics.median(times), "s_min": min(times),
                     "s_max": max(times), "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB, "after_load_gib": after_load,
                     "load_s": load_s, "losses_finite": all(math.isfinite(x) for x in losses),
                     "last_loss": losses[-1], "grad_norms_finite": all(math.isfinite(g) for g in grad_norms),
                     "grad_norms": [round(g, 5) for g in grad_norms[:5]]})
        print(json.dumps(rows[-1]), flush=True)
        del batch
        torch.cuda.empty_cache()
    return rows


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "diffusers", "transformers", "peft", "bitsandbytes", "accelerate"]
    return {n: md.version(n) for n in names} | {"cuda": torch.version.cuda or "", "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default="reference,fluxnb", help="reference, fluxnb; fluxnb variants: -dq (double quant), -compile (torch.compile each block)")
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/flux-random"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.worker:
        rows = worker(*args.worker, cases, args.ckpt, args.warmup, args.steps)
        print("RESULT " + json.dumps(rows))
        return

    from fullsize import build

    build(args.ckpt)
    rows = []
    for impl in args.impls.split(","):
        for dtype_name in sorted({CASES[c][3] for c in cases}):
            mine = [c for c in cases if CASES[c][3] == dtype_name]
            cmd = [sys.executable, __file__, "--worker", impl, dtype_name, "--cases", ",".join(mine), "--ckpt",
                   str(args.ckpt), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not result:
                print(f"{impl}/{dtype_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
                continue
            rows += json.loads(result[-1][len("RESULT "):])
            print(f"{impl}/{dtype_name}: done", flush=True)

    by = {(r["case"], r["impl"]): r for r in rows}
    table = []
    for case in cases:
        ref = by.get((case, "reference"))
        for impl in [i for i in args.impls.split(",") if i != "reference"]:
            mine = by.get((case, impl))
            if ref and mine:
                table.append({"name": case, "impl": impl, "ref_s_per_step": round(ref["s_per_step"], 4),
                              "fluxnb_s_per_step": round(mine["s_per_step"], 4),
                              "speedup": round(ref["s_per_step"] / mine["s_per_step"], 3),
                              "ref_peak_gib": round(ref["peak_allocated_gib"], 3),
                              "fluxnb_peak_gib": round(mine["peak_allocated_gib"], 3)})
    device = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    report = {"device": device, "date": date, "versions": versions(), "command": " ".join(sys.argv),
              "cases": table, "raw": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date}-{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    print(f"\n{'case':<22}{'impl':<10}{'ref s':>8}{'fluxnb s':>10}{'speedup':>9}{'ref GiB':>9}{'fluxnb GiB':>11}")
    for r in table:
        print(f"{r['name']:<22}{r['impl']:<10}{r['ref_s_per_step']:>8.3f}{r['fluxnb_s_per_step']:>10.3f}"
              f"{r['speedup']:>9.2f}{r['ref_peak_gib']:>9.2f}{r['fluxnb_peak_gib']:>11.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
