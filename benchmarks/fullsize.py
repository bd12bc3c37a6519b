"""A full-size FLUX.1-dev transformer with random weights, for timing and memory on the GPU machine.

FLUX.1-dev itself cannot be downloaded there. Its transformer's shape is all that speed and memory depend on, so
this builds one with FLUX.1-dev's exact config (11.9 B parameters) on the GPU in seconds, fills it with small
random values, and saves it in bf16 so that it can be loaded through the real `from_pretrained` + NF4 path.
Image quality means nothing with it; time and memory are real.

    python benchmarks/fullsize.py --out /tmp/flux-random      # -> /tmp/flux-random/transformer/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def build(out: Path, *, seed: int = 0, device: str = "cuda") -> Path:
    """Write out/transformer (bf16 safetensors) unless it is already there; return that folder."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    folder = out / "transformer"
    if (folder / "config.json").is_file():
        return folder
    start = time.perf_counter()
    with init_empty_weights():
        model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:  # fan-in scaled, so activations stay finite through 57 blocks
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    print(f"built random FLUX.1-dev transformer: {n / 1e9:.3f} B params -> {folder} in {time.perf_counter() - start:.0f} s")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flux-random"))
    build(parser.parse_args().out)
