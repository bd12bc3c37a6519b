"""Test helper: how ComfyUI reads a FLUX.1 LoRA file, restated from its source (not copied from it), so that the
tests can hold fluxnb's ComfyUI files against ComfyUI's own rules without ComfyUI installed.

Read in comfyanonymous/ComfyUI (2026):
- comfy/lora.py `model_lora_keys_unet`: for a Flux model, every `diffusion_model.<BFL key>.weight` is reachable as
  `lora_unet_<BFL key, dots as underscores>`, and every diffusers name that comfy/utils.py `flux_to_diffusers`
  lists as `transformer.<name>`, `lycoris_<name, dots as underscores>` and `lora_transformer_<...>`; a name maps
  onto a BFL weight, or onto a row slice of one (to_q is rows 0..h-1 of img_attn.qkv), or onto a weight whose
  update goes through a function (norm_out.linear: BFL's final_layer.adaLN_modulation.1, halves swapped);
- comfy/lora.py `load_lora` with comfy/weight_adapter/lora.py and lokr.py: the tensors read under each key (any
  other key is logged "lora key not loaded" and ignored);
- comfy/lora.py `calculate_weight` and weight_adapter/base.py `weight_decompose`: the weight they compute. A row
  slice is narrowed first and patched alone, so the slice's weight is the diffusers module's own weight.
"""

from __future__ import annotations

import torch

# The tensor names ComfyUI reads under a key x (x.<name>), by adapter.
LORA_TENSORS = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_B.weight", "lora_A.weight",
                "_lora.up.weight", "_lora.down.weight", "lora.up.weight", "lora.down.weight"}
LOKR_TENSORS = {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
SHARED_TENSORS = {"alpha", "dora_scale", "reshape_weight"}


SWAPPED = "norm_out.linear"  # BFL's final_layer.adaLN_modulation.1: ComfyUI swaps the halves of its update


def flux_names(double: int, single: int) -> list[str]:
    """The diffusers modules flux_to_diffusers maps onto BFL's weights: q, k, v (and a single block's proj_mlp)
    onto row slices of the fused Linears (img_attn.qkv, txt_attn.qkv, linear1), the rest onto whole weights."""
    names = []
    for i in range(double):
        b = f"transformer_blocks.{i}"
        names += [f"{b}.attn.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                            "to_out.0", "to_add_out")]
        names += [f"{b}.{n}" for n in ("norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2",
                                       "ff_context.net.0.proj", "ff_context.net.2")]
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        names += [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp", f"{b}.norm.linear",
                  f"{b}.proj_out"]
    embedders = ("timestep_embedder", "text_embedder", "guidance_embedder")
    return names + ["proj_out", "x_embedder", "context_embedder", SWAPPED,
                    *(f"time_text_embed.{e}.linear_{j}" for e in embedders for j in (1, 2))]


def bfl_names(double: int, single: int) -> list[str]:
    """The weights of BFL's FLUX model (ComfyUI's diffusion_model.*), without their ".weight"."""
    names = [f"double_blocks.{i}.{s}_{n}" for i in range(double) for s in ("img", "txt")
             for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin")]
    names += [f"single_blocks.{i}.{n}" for i in range(single) for n in ("linear1", "linear2", "modulation.lin")]
    return names + ["img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1",
                    *(f"{e}.{j}_layer" for e in ("time_in", "vector_in", "guidance_in") for j in ("in", "out"))]


def key_map(double: int, single: int) -> dict[str, str]:
    """Every key prefix ComfyUI maps for a FLUX LoRA -> the diffusers module it patches (for diffusers-named keys),
    or "bfl:<BFL weight>" (kohya's lora_unet_* keys)."""
    found = {f"lora_unet_{name.replace('.', '_')}": f"bfl:{name}" for name in bfl_names(double, single)}
    for name in flux_names(double, single):
        flat = name.replace(".", "_")
        found |= {f"transformer.{name}": name, f"lycoris_{flat}": name, f"lora_transformer_{flat}": name}
    return found


def unread(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> list[str]:
    """The keys of `state` that ComfyUI's load_lora would not load (it warns "lora key not loaded")."""
    read = set()
    for x in prefixes:
        lora = any(f"{x}.{t}" in state for t in ("lora_up.weight", "lora_B.weight", "lora.up.weight")) or \
            f"{x}_lora.up.weight" in state
        lokr = any(f"{x}.{t}" in state for t in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"))
        read |= {f"{x}.{t}" for t in SHARED_TENSORS if f"{x}.{t}" in state}
        if lora:
            read |= {k for t in LORA_TENSORS for k in (f"{x}.{t}", f"{x}{t}") if k in state}
        if lokr:
            read |= {f"{x}.{t}" for t in LOKR_TENSORS if f"{x}.{t}" in state}
    return sorted(set(state) - read)


def _swap(w: torch.Tensor) -> torch.Tensor:
    shift, scale = w.chunk(2)
    return torch.cat([scale, shift])


def patched(weight: torch.Tensor, t: dict[str, torch.Tensor], *, swapped: bool = False,
            dora_norm_of_update: bool = False) -> torch.Tensor:
    """The weight ComfyUI makes from one module's tensors `t` at strength 1, in fp64, in diffusers' row order.

    weight: the diffusers module's weight (a fused slice is patched alone: the same rows). swapped: the module is
    norm_out.linear (BFL stores it, and ComfyUI patches it, with its halves swapped). DoRA on the output axis
    divides by ||W|| in ComfyUI today; dora_norm_of_update=True divides by ||W + dW|| instead (DoRA, peft, and
    ComfyUI pull request 15458)."""
    w = _swap(weight.double()) if swapped else weight.double()
    t = {k: v.double() for k, v in t.items()}
    fn = _swap if swapped else (lambda d: d)
    if "lora_up.weight" in t:
        alpha = t["alpha"].item() / t["lora_down.weight"].shape[0] if "alpha" in t else 1.0
        diff = t["lora_up.weight"] @ t["lora_down.weight"]
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        alpha = t["alpha"].item() / dim if "alpha" in t and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(w.shape)
    if "dora_scale" not in t:
        out = w + fn(alpha * diff)
    else:
        scale = t["dora_scale"]
        calc = w + fn(diff * alpha)
        assert scale.shape[0] == w.shape[0], "not ComfyUI's output axis"
        norm = (calc if dora_norm_of_update else w).reshape(w.shape[0], -1).norm(dim=1, keepdim=True)
        out = calc * (scale / (norm + torch.finfo(torch.float32).eps))
    return _swap(out) if swapped else out
