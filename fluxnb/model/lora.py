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
Adapter types (LoRAConfig.type), all peft's own:
  "lora"  the above.
  "dora"  W' = m * (W + dW) / ||W + dW|| row by row: LoRA's dW plus a learned magnitude m per output row (peft's
          use_dora; 3072 numbers per adapted layer, 2.3 MB in fp32 for the blog's 190 layers). Trains on NF4.
  "lokr"  dW = alpha / r * kron(w1, w2): w1 (48 x 48) full, w2 (64 x 64) of rank r below 32 (peft's LoKrConfig;
          2,816 numbers per 3072 x 3072 layer at r = 4). Not on NF4: peft reshapes the product to the base weight's
          shape, and bitsandbytes stores a 4-bit weight packed (`nf4_problem`).
This module owns the LoRA files: `save_lora` writes them, `load_lora_` reads them back into an adapter, `read_adapter`
reads one for merging (`merge_module`) and export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoKrConfig, LoraConfig

from ..base.errors import FluxnbError
from ..base.files import atomic_path
from ..config import LORA_TARGETS, LoRAConfig
from ..run import LORA_FILE

NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr"}  # LoRAConfig.type, as people write it
_INITS = {"gaussian": "gaussian", "default": True}  # not pissa/olora: they change the base (config.BASE_CHANGING_INITS)


def peft_config(cfg: LoRAConfig) -> LoraConfig | LoKrConfig:
    """peft's config for `cfg`: LoraConfig (with use_dora for "dora"), or LoKrConfig (which starts at dW = 0)."""
    if cfg.type == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights=_INITS[cfg.init],
                      target_modules=cfg.target_modules, use_dora=cfg.type == "dora")


def nf4_problem(cfg: LoRAConfig, quantization: str) -> str | None:
    """Why adapter `cfg` cannot train on a base quantized as `quantization`, or None."""
    if cfg.type == "lokr" and quantization == "nf4":
        return ("lora.type='lokr' cannot train on the NF4 base: peft's LoKr reshapes its Kronecker product to the base "
                "weight's shape, and bitsandbytes stores a 4-bit weight packed. Use lora.type='dora' or 'lora' on NF4, "
                "or model.quantization='none' or 'fp8' (16-bit weights: ~24 GB for FLUX.1-dev, A100/H100 class).")
    return None


def add_lora(transformer: torch.nn.Module, cfg: LoRAConfig, *, seed: int | None = None) -> int:
    """Freeze the transformer, add the LoRA adapter, keep its weights in fp32; return the trainable count.

    With the gaussian/default init A starts random (seeded by `seed`) and B at zero: the adapted model equals
    the base until it learns.

    fp32 LoRA weights matter with fp16/bf16 bases: an update of lr * grad ~ 1e-4 * 1e-3 vanishes when added to
    a bf16 number (8 bits of mantissa). The base stays in its low precision; only the 0.04 % that learn are fp32.
    """
    from diffusers.training_utils import cast_training_params

    import bitsandbytes as bnb

    if any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules()) and (why := nf4_problem(cfg, "nf4")):
        raise FluxnbError(why)
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
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "lokr_" in k]
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise FluxnbError(f"{folder} does not fit this adapter (missing {missing[:2]}, unexpected {unexpected[:2]}): it "
                          "was saved with other LoRA targets or rank.")


@dataclass(frozen=True)
class Adapter:
    """A saved adapter: its type, peft's config as the file's metadata gives it, and {module: {name: tensor}} with
    peft's names (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`, `lokr_w1`, `lokr_w2_a`, ...)."""

    type: str  # "lora", "dora" or "lokr" (as LoRAConfig.type)
    config: LoraConfig | LoKrConfig
    modules: dict[str, dict[str, torch.Tensor]]


def adapter_type(keys) -> str:
    """"lokr", "dora" or "lora", from a state dict's keys in peft's names."""
    keys = list(keys)
    return "lokr" if any(".lokr_" in k for k in keys) else "dora" if any("lora_magnitude_vector" in k for k in keys) \
        else "lora"


_PART = re.compile(r"^(.+?)\.((?:lora_|lokr_).+)$")  # module name, peft's name of the tensor in it


def file_type(path: str | Path) -> str:
    """adapter_type of a safetensors LoRA file (kohya's files too: "lora")."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FluxnbError(f"{path} does not exist: train a LoRA first (notebook 03 / `python -m fluxnb train`).")
    with safe_open(str(path), "pt") as f:
        return adapter_type(f.keys())


def read_adapter(path: str | Path) -> Adapter:
    """A LoRA file fluxnb (or diffusers' training scripts) wrote, with the adapter config from its metadata."""
    from diffusers import FluxPipeline

    path = Path(path)
    state, meta = FluxPipeline.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in (meta or {}).items() if k.startswith("transformer.")}
    kind = adapter_type(state)
    if not meta or meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise FluxnbError(f"{path} carries no single adapter config (rank, alpha) in its metadata: fluxnb merges and "
                          "exports the LoRAs it trained.")
    config = (LoKrConfig if kind == "lokr" else LoraConfig)(**meta)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, part = _PART.match(key.removeprefix("transformer.")).groups()
        modules.setdefault(name, {})[part] = value
    return Adapter(kind, config, modules)


def merge_module(weight: torch.Tensor, tensors: dict[str, torch.Tensor], config, scale: float = 1.0) -> torch.Tensor:
    """`weight` (out, in) with one module's adapter merged in, by peft's own layer and its `merge` (DoRA's
    magnitude and row norms, LoKr's Kronecker product): the weight peft's merge_and_unload would leave."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    holder = torch.nn.Module()
    holder.add_module("layer", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    holder.layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    inject_adapter_in_model(replace(config, target_modules=["layer"], inference_mode=True), holder)
    set_peft_model_state_dict(holder, {f"layer.{k}": v.to(weight) for k, v in tensors.items()})
    holder.layer.set_scale("default", scale)
    holder.layer.merge()
    return holder.layer.get_base_layer().weight.data
