"""Test helper: LoRA files in stock diffusers format, made directly on a FLUX transformer (no training needed).

Same calls as training (peft adapter, get_peft_model_state_dict, FluxPipeline.save_lora_weights with the
LoraConfig as metadata), but lora_B is random instead of zero, so the adapter visibly changes every output.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
FLUX_DEV_WIDTH = dict(attention_head_dim=128, num_attention_heads=24)  # inner width 3072, like FLUX.1-dev


def save_random_lora(transformer: FluxTransformer2DModel, folder: Path, *, seed: int = 0, targets=ATTENTION,
                     r: int = 4, alpha: float = 4.0, std: float = 0.5, **config) -> Path:
    """Add a LoRA to `transformer` (left in place, as adapter "default"), randomize it, save it; return the file."""
    transformer.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=targets, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:  # A is gaussian already; B starts at zero: give both a seed-defined value
                p.copy_(torch.randn(p.shape, generator=gen) * (std if "lora_B" in name else 1 / p.shape[1] ** 0.5))
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    return Path(folder) / "pytorch_lora_weights.safetensors"


def make_lora(model_dir: Path, folder: Path, **kwargs) -> Path:
    """A random LoRA for the transformer of the FLUX pipeline at `model_dir`."""
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    return save_random_lora(transformer, folder, **kwargs)


def wide_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """One single block at FLUX.1-dev's width (q, k, v 3072; mlp 12288), no double block: 191 M params (0.8 GB).

    diffusers' kohya reader hard-codes those widths for single blocks, so this is the smallest model on which
    a ComfyUI file with single-block LoRAs can be loaded back into a pipeline. Its other sizes fit the tiny pipeline.
    """
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0, num_single_layers=1,
                                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56), **FLUX_DEV_WIDTH)
