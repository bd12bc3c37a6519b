"""LoRA adapters on the FLUX transformer: presets, adding them, counting them, saving them for stock diffusers.

LoRA keeps a frozen weight W (d x k) and learns dW = (alpha / r) * B @ A with A (r x k), B (d x r). With r = 4 on
FLUX.1-dev's attention projections (the blog's recipe) that is 4,669,440 trainable numbers next to 11.9 B frozen
ones: 19 double blocks x 4 projections (q, k, v, out) + 38 single blocks x 3 (q, k, v), each 3072 -> 3072, each
adding r * (3072 + 3072) = 24,576 parameters: (76 + 114) * 24,576 = 4,669,440.

Presets (LoRAConfig.targets, defined in fluxnb.config.LORA_TARGETS):
  "attention"      the blog's to_q, to_k, to_v, to_out.0 (image-stream attention of every block)
  "all-linear"     every Linear layer (peft's shorthand): attention, MLPs, modulation, embedders; ~40x more params
  "single-blocks"  every projection of the 38 single-stream blocks (q, k, v, proj_mlp, proj_out), nothing in the
                   19 double blocks: a common choice for style LoRAs
  or a comma-separated list of module names ("to_q,to_v", matched as name suffixes by peft).
This module owns the LoRA files: `save_lora` writes them, `load_lora_` reads them back into an adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig

from ..base.errors import FluxnbError
from ..base.files import atomic_path
from ..config import LORA_TARGETS, LoRAConfig
from ..run import LORA_FILE

_INITS = {"gaussian": "gaussian", "default": True}  # not pissa/olora: they change the base (config.BASE_CHANGING_INITS)


def peft_config(cfg: LoRAConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights=_INITS[cfg.init],
                      target_modules=cfg.target_modules)


def add_lora(transformer: torch.nn.Module, cfg: LoRAConfig, *, seed: int | None = None) -> int:
    """Freeze the transformer, add the LoRA adapter, keep its weights in fp32; return the trainable count.

    With the gaussian/default init A starts random (seeded by `seed`) and B at zero: the adapted model equals
    the base until it learns.

    fp32 LoRA weights matter with fp16/bf16 bases: an update of lr * grad ~ 1e-4 * 1e-3 vanishes when added to
    a bf16 number (8 bits of mantissa). The base stays in its low precision; only the 0.04 % that learn are fp32.
    """
    from diffusers.training_utils import cast_training_params

    transformer.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        transformer.add_adapter(peft_config(cfg))
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise FluxnbError(f"LoRA targets {cfg.targets!r} match no layer of this transformer ({err}); use a preset "
                              f"({', '.join(LORA_TARGETS)}) or module names such as to_q,to_v.") from None
        raise
    cast_training_params(transformer, dtype=torch.float32)
    return count_trainable(transformer)


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(transformer) -> str:
    """The blog's line: `trainable params: 4,669,440 || all params: 11,906,077,760` (4-bit weights count as 2 each)."""
    return (f"trainable params: {transformer.num_parameters(only_trainable=True):,} || "
            f"all params: {transformer.num_parameters():,}")


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's names (`...to_q.lora_A.weight`), copied to the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer, folder: str | Path, *, weight_name: str = LORA_FILE) -> Path:
    """Write folder/pytorch_lora_weights.safetensors in stock diffusers format, atomically.

    Keys are `transformer.<module>.lora_A.weight` / `lora_B.weight`; the adapter's LoraConfig (rank, alpha,
    targets) goes into the file's metadata, so `FluxPipeline.load_lora_weights(folder)` rebuilds it exactly.
    """
    from diffusers import FluxPipeline
    from diffusers.training_utils import _collate_lora_metadata

    path = Path(folder) / weight_name
    weights = lora_state_dict(transformer)
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:  # never write a LoRA that would turn every image into NaN
        raise FluxnbError(f"refusing to save a LoRA with non-finite weights (first: {bad[0]})")
    with atomic_path(path) as tmp:
        FluxPipeline.save_lora_weights(tmp.parent, transformer_lora_layers=weights, weight_name=tmp.name,
                                       **_collate_lora_metadata({"transformer": transformer}))
    return path


def load_lora_(transformer, folder: str | Path, *, weight_name: str = LORA_FILE) -> None:
    """Copy saved LoRA weights into the adapter already on `transformer` (same targets and rank): for resuming."""
    from diffusers import FluxPipeline
    from peft import set_peft_model_state_dict

    state = FluxPipeline.lora_state_dict(str(folder), weight_name=weight_name)
    weights = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, weights, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise FluxnbError(f"{folder} does not fit this adapter (missing {missing[:2]}, unexpected {unexpected[:2]}): it "
                          "was saved with other LoRA targets or rank.")
