"""An ESTIMATE of each notebook's compute time on a free-Colab T4, from counted FLOPs (no T4 here to measure on).

    python benchmarks/t4_estimate.py --out benchmarks/results/2026-12-01-t4-estimate.json

The work is counted, not guessed: torch's FlopCounterMode runs FLUX.1-dev's full-size components (the configs of
benchmarks/fullsize.py) on the meta device, so nothing is allocated, for exactly the shapes the notebooks use:
T5-XXL + CLIP-L on a 77-token caption (01), the VAE encoder on a 512x768 image (02), the transformer's forward
at 512x768 with 77 text tokens (03 trains it: forward + backward ~ 3x forward, + 1x forward again with gradient
checkpointing; 04 samples 28 steps, one forward each: FLUX.1-dev is guidance-distilled), the VAE decoder (04).
Time = FLOPs / (65 TFLOP/s fp16 tensor peak x SUSTAINED). Only matmuls and convolutions are counted; NF4
dequantization, attention softmax, norms, loading from disk and Python overhead are not, so these are lower
bounds of compute time, not wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fullsize

T4_PEAK = 65e12  # fp16 tensor-core peak, NVIDIA T4 datasheet
# A T4 is a 70 W card: under sustained tensor-core load it throttles from its 1,590 MHz boost clock, and large
# fp16 GEMMs reach ~40-50% of the datasheet peak in public cuBLAS benchmarks; FLUX's LoRA step adds NF4
# dequantization before every matmul and attention without FlashAttention-2 (sm_75). 35% is assumed.
SUSTAINED = 0.35
WIDTH, HEIGHT, TEXT_TOKENS = 512, 768, 77
BLOG_T4_HOURS = 4.0  # the blog: "around 4 hours" for 700 steps (batch 1 x accumulation 4) on a T4


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def meta(cls, config):
    return fullsize._empty(cls, config, "meta", torch.float16)


def count() -> dict[str, float]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = meta(T5EncoderModel, T5Config(**fullsize.T5_XXL))
    clip = meta(CLIPTextModel, CLIPTextConfig(**fullsize.CLIP_L))
    vae = meta(AutoencoderKL, fullsize.FLUX_VAE)
    transformer = meta(FluxTransformer2DModel, fullsize.FLUX_DEV_TRANSFORMER)
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    image = torch.zeros(1, 3, HEIGHT, WIDTH, device="meta", dtype=torch.float16)
    inputs = fullsize.transformer_inputs(WIDTH, HEIGHT, TEXT_TOKENS, dtype=torch.float16)
    latent = torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8, device="meta", dtype=torch.float16)
    with torch.no_grad():
        return {
            "text_encoders_per_caption": flops(lambda: (t5(ids), clip(ids))),
            "vae_encode_per_image": flops(lambda: vae.encode(image)),
            "vae_decode_per_image": flops(lambda: vae.decode(latent)),
            "transformer_forward_per_image": flops(lambda: transformer(**inputs)),
        }


def estimate(counted: dict[str, float], captions: int = 22, images: int = 24, steps: int = 700,
             samples_per_step: int = 4, grids: int = 8, grid_images: int = 2, grid_steps: int = 20) -> dict:
    """Seconds of compute per notebook for the blog's run (700 steps x 4 samples, Mucha-sized dataset)."""
    rate = T4_PEAK * SUSTAINED
    fwd = counted["transformer_forward_per_image"]
    step = samples_per_step * fwd * 4  # forward, backward (2x), the checkpointed forward again
    image_28 = 28 * fwd + counted["vae_decode_per_image"]
    nb04 = 12 * image_28  # base + LoRA x 2 prompts, 1 image, a 4-scale sweep, 1 blend, 2 merged
    grid = grid_images * (grid_steps * fwd + counted["vae_decode_per_image"])
    seconds = {
        "01_embeddings": captions * counted["text_encoders_per_caption"] / rate,
        "02_cache_latents": images * counted["vae_encode_per_image"] / rate,
        "03_train_step_4_samples": step / rate,
        "03_train_700_steps": (steps * step + grids * grid) / rate,
        "04_one_image_28_steps": image_28 / rate,
        "04_inference_merge": nb04 / rate,
    }
    return {"estimate": True, "t4_fp16_peak_flops": T4_PEAK, "sustained_fraction": SUSTAINED,
            "flops": counted, "seconds": seconds, "train_hours": seconds["03_train_700_steps"] / 3600,
            "blog_t4_hours": BLOG_T4_HOURS}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), **estimate(count())}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
