"""GPU check of fluxnb's training path on a full-size (random-weight) FLUX.1-dev transformer: s/step and memory.

    python benchmarks/gpu_train_check.py                       # the blog's base (plain NF4), bf16: t4/4090 presets
    python benchmarks/gpu_train_check.py --double-quant        # the 12gb preset (NF4 + double quantization)
    python benchmarks/gpu_train_check.py --variant reference   # + peft's fp32 upcast
    python benchmarks/gpu_train_check.py --dtype fp16          # the t4-16gb preset's arithmetic
    python benchmarks/gpu_train_check.py --quantization none --optimizer adamw   # the h100-80gb preset

1. builds FLUX.1-dev's transformer from its config with random weights and saves it in bf16 to --out
   (benchmarks/fullsize.py; skipped when already there),
2. loads it through fluxnb.model.quant.load_transformer (diffusers' BitsAndBytesConfig NF4 on CUDA, the real path),
3. adds LoRA r4 on to_q/to_k/to_v/to_out.0 (fluxnb.model.lora.add_lora: 4,669,440 parameters),
4. trains --steps steps at 512x768 (latent 16x96x64) with 77 text tokens of random cached-like inputs, with the
   loop's own pieces: fluxnb.train.step.training_step under accelerate (mixed precision, clipping), 8-bit AdamW,
   gradient checkpointing,
5. prints the median s/step after --warmup steps and peak allocated / reserved GiB of the training steps.

Target: peak allocated <= 7.94 GiB, the reference recipe's (DESIGN.md, H100, bf16, 512x768).
Why skipping peft's prepare_model_for_kbit_training is safe (fluxnb's default): called as the reference does
(use_gradient_checkpointing=False) it freezes every parameter and casts the frozen, non-quantized ones (Linear4bit
biases, RMSNorm scales) to fp32. They receive no gradient, so fp32 adds no optimizer precision; the forward runs
under bf16/fp16 autocast anyway; bitsandbytes casts each Linear4bit bias back to the input dtype at its first
call; the trained LoRA weights are fp32 regardless (cast_training_params). Compare the two with --variant.
Measured (BENCHMARKS.md): the upcast costs ~0.01 GiB on FLUX; double quantization saves 0.5 GiB.
Needs: torch (CUDA), diffusers, bitsandbytes, accelerate, peft (no tqdm/psutil/matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing fluxnb
sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 2**30
REFERENCE_PEAK_GIB = 7.94
# FLUX.1-dev's scheduler/scheduler_config.json and the VAE factors of vae/config.json
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_DEV_VAE = {"shift_factor": 0.1159, "scaling_factor": 0.3611, "block_out_channels": [128, 256, 512, 512]}


def random_batch(height: int, width: int, tokens: int, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Shaped like one cached sample of notebooks 01/02: VAE posterior (16, h/8, w/8), T5 (L, 4096), CLIP (768)."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    return {"latent_mean": torch.randn(1, 16, h, w, generator=g).to(device),
            "latent_std": torch.full((1, 16, h, w), 0.05).to(device),
            "prompt_embeds": (0.1 * torch.randn(1, tokens, 4096, generator=g)).to(device, dtype),
            "pooled_prompt_embeds": (0.1 * torch.randn(1, 768, generator=g)).to(device, dtype),
            "text_ids": torch.zeros(tokens, 3, device=device, dtype=dtype)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flux-random"), help="random checkpoint folder")
    parser.add_argument("--variant", choices=("fluxnb", "reference"), default="fluxnb",
                        help="reference = also run peft's prepare_model_for_kbit_training (fp32 frozen weights)")
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--double-quant", action="store_true",
                        help="quantize the NF4 scales too (the 12gb preset): -0.5 GiB, slower per step")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=77)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this check needs a CUDA GPU")
        return 1

    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler
    from fullsize import build

    from fluxnb.config import LoRAConfig, ModelConfig, TrainConfig
    from fluxnb.run.hardware import detect
    from fluxnb.model import lora, quant
    from fluxnb.train import flow
    from fluxnb.train.step import LatentScale, make_optimizer, training_step

    folder = build(args.out)  # out/transformer, bf16
    hw = detect("real", args.dtype)
    print(hw.describe())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    model_cfg = ModelConfig(model_id=str(folder.parent), quantization=args.quantization, double_quant=args.double_quant)
    transformer = quant.load_transformer(model_cfg, hw, prepare_kbit=args.variant == "reference")
    print(f"loaded in {time.perf_counter() - start:.0f} s: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated")
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    lora.add_lora(transformer, LoRAConfig(rank=4, alpha=4.0, targets="attention"), seed=0)
    print(lora.describe(transformer))

    train_cfg = TrainConfig(optimizer=args.optimizer, gradient_accumulation_steps=1)
    accelerator = Accelerator(mixed_precision=args.dtype, gradient_accumulation_steps=1)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train_cfg)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    table = flow.NoiseTable.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER))
    latent = LatentScale.from_vae_config(FLUX_DEV_VAE)
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(args.height, args.width, args.tokens, hw.device, hw.dtype)
    after_load = torch.cuda.memory_allocated() / GiB
    torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    transformer.train()
    for i in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with accelerator.accumulate(transformer):  # the training loop's micro-step, accumulation 1
            loss = training_step(transformer, batch, table, train_cfg, latent, generator, hw.dtype)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"step {i + 1:3d}: {times[-1]:.3f} s  loss {losses[-1]:.4f}", flush=True)

    peak, reserved = torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB
    per_step = statistics.median(times[args.warmup:] or times)
    name = (f"{args.variant}, {args.quantization}{' + double quant' if args.double_quant and args.quantization == 'nf4' else ''}, "
            f"{'checkpointing' if args.checkpointing else 'no checkpointing'}, {args.optimizer}, {args.dtype}, "
            f"{args.width}x{args.height}, {args.tokens} text tokens")
    print(f"\n{name} on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"s/step (median of steps {args.warmup + 1}-{args.steps}): {per_step:.3f}")
    print(f"allocated after load + LoRA + optimizer: {after_load:.2f} GiB")
    print(f"peak allocated: {peak:.2f} GiB   peak reserved: {reserved:.2f} GiB")
    ok = all(map(lambda v: v == v, losses))  # no NaN
    print(f"target peak allocated <= {REFERENCE_PEAK_GIB} GiB: {'PASS' if peak <= REFERENCE_PEAK_GIB else 'FAIL'}"
          f"{'' if ok else '   (NaN loss!)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
