"""DoRA and LoKr for ComfyUI and Forge: LyCORIS tensors under diffusers' module names (SimpleTuner's layout).

kohya's FLUX layout (fluxnb.infer.export) fuses q, k and v into one Linear. A LoRA survives that as one LoRA of
rank 3r; these two adapters do not: a Kronecker product on the fused weight is not three products on its slices,
and DoRA's magnitude would need the base weights of the slices the adapter leaves alone (linear1's mlp rows). But
ComfyUI also maps `lycoris_<diffusers module, dots as underscores>` onto FLUX's weights, slices included
(comfy/lora.py model_lora_keys_unet; comfy/utils.py flux_to_diffusers: to_q is rows 0-3071 of img_attn.qkv, and
it patches that slice alone), and reads there (comfy/weight_adapter/lokr.py, lora.py, base.py weight_decompose):

    LoKr   .lokr_w1, .lokr_w2 (or .lokr_w2_a, .lokr_w2_b), .alpha    dW = alpha / rank * kron(w1, w2)
    DoRA   .lora_down.weight (A), .lora_up.weight (B), .alpha, .dora_scale (out, 1): on the output axis, as peft

Where ComfyUI differs from peft, the file is written so that it reads the same adapter:
- LoKr: alpha / rank applies only when a factor is stored as a product (w2_a @ w2_b), rank being that product's;
  with both factors whole, w1 is stored already multiplied by alpha / r;
- DoRA: a magnitude of shape (out,) broadcasts to (out, out) there (ComfyUI issue 12938), so it is stored (out, 1);
  FLUX's final norm_out.linear is stored with its scale and shift halves swapped, as ComfyUI swaps its weight.
One difference remains: ComfyUI divides a DoRA's rows by the base rows' norms ||W|| where peft (and DoRA's paper)
divide by ||W + dW|| (ComfyUI pull request 15458, open in 2026-08): each row of the merged weight is off by the
factor ||W + dW|| / ||W||, i.e. by about the relative size of that row's update.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..base.errors import FluxnbError
from ..model.lora import Adapter, read_adapter

PREFIX = "lycoris_"
TOLERANCE = 8 * torch.finfo(torch.float32).eps  # the file is fp32; LoKr's w1 may hold alpha / r once rounded
SWAPPED = "norm_out.linear"  # ComfyUI stores it as BFL's final_layer.adaLN_modulation.1, halves swapped


def key(module: str) -> str:
    return PREFIX + module.replace(".", "_")


def _swap(m: torch.Tensor) -> torch.Tensor:
    shift, scale = m.chunk(2)
    return torch.cat([scale, shift])


def _scaling(adapter: Adapter) -> float:
    c = adapter.config
    if adapter.type == "lokr":
        return c.alpha / c.r
    return c.lora_alpha / (math.sqrt(c.r) if c.use_rslora else c.r)


def _lokr(t: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft's LoKr factors as ComfyUI reads them (see the module docstring for alpha)."""
    parts = {k: v for k, v in t.items() if k.startswith("lokr_")}
    rank = next((parts[f"{w}_b"].shape[0] for w in ("lokr_w2", "lokr_w1") if f"{w}_b" in parts), None)
    if rank is None:  # both factors whole: ComfyUI takes alpha / rank as 1
        return parts | {"lokr_w1": parts["lokr_w1"] * scaling}
    return parts | {"alpha": torch.tensor(float(scaling * rank))}


def to_comfyui(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A DoRA or LoKr (fluxnb.model.lora.read_adapter) -> {lycoris_<module>.<tensor>: tensor} for ComfyUI/Forge."""
    if adapter.config.rank_pattern or adapter.config.alpha_pattern:
        raise FluxnbError("this adapter has per-layer ranks or alphas; fluxnb exports the adapters it trained.")
    scaling, out = _scaling(adapter), {}
    for module, t in sorted(adapter.modules.items()):
        if adapter.type == "lokr":
            parts = _lokr(t, scaling)
        else:  # DoRA: ComfyUI's alpha / rank is alpha / A's rows
            m = t["lora_magnitude_vector"]
            parts = {"lora_down.weight": t["lora_A.weight"], "lora_up.weight": t["lora_B.weight"],
                     "alpha": torch.tensor(float(scaling * t["lora_A.weight"].shape[0])),
                     "dora_scale": (_swap(m) if module == SWAPPED else m).reshape(-1, 1)}
        out |= {f"{key(module)}.{name}": v.contiguous() for name, v in parts.items()}
    return out


def comfyui(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (`to_comfyui`) and the header of the file for ComfyUI and Forge."""
    return to_comfyui(adapter), {"format": "pt", "fluxnb_layout": "lycoris-diffusers-names",
                                 "fluxnb_adapter": adapter.type}


def read_back(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{diffusers module: {tensor name: tensor}} of a file `export` wrote (module names from the key's prefix)."""
    from safetensors.torch import load_file

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in load_file(str(path)).items():
        head, _, part = name.partition(".")
        modules.setdefault(head, {})[part] = value
    return modules


def delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """A module's update as ComfyUI computes it from the file's tensors, in fp64: alpha / rank * up @ down, or
    alpha / rank * kron(w1, w2) (DoRA's magnitude apart)."""
    t = {k: v.double() for k, v in t.items()}
    if "lora_up.weight" in t:
        return t["alpha"] / t["lora_down.weight"].shape[0] * t["lora_up.weight"] @ t["lora_down.weight"]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return (t["alpha"] / rank if rank is not None else 1.0) * torch.kron(w1, w2)


def _want(adapter: Adapter, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft's update of a module, in fp64 (for LoKr, peft's own kron: make_kron)."""
    from peft.tuners.lokr.layer import make_kron

    s, t = _scaling(adapter), {k: v.double() for k, v in t.items()}
    if adapter.type != "lokr":
        return s * t["lora_B.weight"] @ t["lora_A.weight"]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return make_kron(w1, w2, s)


def compare(original: str | Path, exported: str | Path) -> tuple[int, float]:
    """Every module of `original` read back from `exported` the way ComfyUI reads it: (modules compared, max relative
    error of their updates, DoRA's magnitudes included)."""
    adapter, got = read_adapter(original), read_back(exported)
    missing = sorted(set(map(key, adapter.modules)) - set(got))
    if missing:
        raise FluxnbError(f"{Path(exported).name} lost {len(missing)} modules, e.g. {missing[0]}.")
    errors = []
    for module, t in adapter.modules.items():
        back, want = got[key(module)], _want(adapter, t)
        errors.append(float((delta(back) - want).norm() / want.norm().clamp_min(1e-300)))
        if "lora_magnitude_vector" in t:
            m = back["dora_scale"].reshape(-1)
            m = _swap(m) if module == SWAPPED else m
            want_m = t["lora_magnitude_vector"].double()
            errors.append(float((m.double() - want_m).abs().max() / want_m.abs().max().clamp_min(1e-300)))
    error = max(errors, default=0.0)
    if error > TOLERANCE:
        raise FluxnbError(f"{Path(exported).name} does not read back as the same adapter (max relative error "
                          f"{error:.2e} > {TOLERANCE:.1e}).")
    return len(adapter.modules), error
