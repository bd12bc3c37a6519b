"""What autograd keeps per FLUX.1-dev block for the backward pass, counted on the CPU without a GPU or weights.

    count(512, 768, text_tokens=77, batch=4, dtype=torch.float16)   # -> Saved(double=..., single=..., ...)

One double-stream and one single-stream block of FLUX.1-dev's real sizes (diffusers' FluxTransformer2DModel,
peft's LoRA from fluxnb.model.lora) run one forward on the "meta" device, where tensors have shapes and dtypes but
no memory, so the full model's sizes cost nothing. A saved-tensor hook sees every tensor that autograd keeps;
distinct storages are summed per block (a view of a kept tensor costs nothing more), parameters left out. What
makes it the GPU's eager step and not the CPU's:
- CUDA's autocast: F.linear, matmuls and attention in the compute dtype, layer_norm / rms_norm / pow / rsqrt
  / exp / mse_loss in fp32 (the op lists of ATen's autocast_mode.h), emulated by a TorchFunctionMode, since
  CPU autocast has other lists and CUDA's cannot run without a GPU;
- the frozen NF4 Linears: bitsandbytes' MatMul4Bit keeps no activation (its ctx.tensors = (None, B)), like a
  frozen nn.Linear here, which keeps only its weight (a parameter, not counted);
- attention: the memory-efficient kernel, the one a T4 has (and the size flash and cuDNN keep too: q, k, v,
  the output and its log-sum-exp), not the math path that meta tensors would otherwise take.
A checkpointed block keeps only its inputs (torch.utils.checkpoint holds the forward's arguments and rebuilds
the rest in the backward pass), so its count is the size of its tensor inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from fluxnb.config import LoRAConfig

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json), one block of each kind.
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
_LOWER = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "scaled_dot_product_attention"}
_FP32 = {"layer_norm", "rms_norm", "group_norm", "pow", "rsqrt", "exp", "log", "mse_loss", "softmax", "log_softmax"}


@dataclass(frozen=True)
class Saved:
    """Bytes autograd keeps for the backward pass: per block of each kind, and once for all of them."""

    double: int  # one double-stream block
    single: int  # one single-stream block
    shared: int  # kept once and used by every block (the time embedding, the rotary tables)
    tokens: int  # image + text tokens of the whole batch

    def per_token(self, kind: str) -> float:
        return getattr(self, kind) / self.tokens


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype)'s casts, for the ops a FLUX block runs, on any device; scaled-dot-product
    attention as the memory-efficient kernel (what it keeps for the backward pass on a GPU)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER:
            args, kwargs = _cast((args, kwargs), self.dtype)
        elif name in _FP32:
            args, kwargs = _cast((args, kwargs), torch.float32)
        if name == "scaled_dot_product_attention":
            return _efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cast(tree, dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    return torch.utils._pytree.tree_map(cast, tree)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    # (B, heads, N, head_dim) in and out; ATen's kernel takes (B, N, heads, head_dim).
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p, is_causal,
                                                                  scale=scale)[0]
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=8)
def _model(dtype: torch.dtype, lora_json: str):
    from diffusers import FluxTransformer2DModel

    from fluxnb.model.lora import add_lora

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **FLUX_DEV)
    model.to(dtype)  # the frozen base in the compute dtype (NF4 layers compute in it); the LoRA in fp32
    add_lora(model, LoRAConfig(**json.loads(lora_json)))
    return model


def count(width: int, height: int, text_tokens: int, batch: int, dtype: torch.dtype = torch.bfloat16,
          checkpointed: bool = False, lora: LoRAConfig = LoRAConfig()) -> Saved:
    """Bytes autograd keeps per block in fluxnb's eager training step (see the module docstring)."""
    model = _model(dtype, json.dumps(dataclasses.asdict(lora)))
    img, meta = (height // 16) * (width // 16), torch.device("meta")
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in [*model.parameters(), *model.buffers()]}
    owner: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    inputs: dict[str, int] = {}
    current = ["outside"]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = StorageWeakRef(storage).cdata
        if key not in params:
            owner.setdefault(key, set()).add(current[0])
            sizes[key] = storage.nbytes()
        return t

    def enter(kind):
        def hook(module, args, kwargs):
            current[0] = kind
            tensors = [t for t in (*args, kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states"))
                       if isinstance(t, torch.Tensor)]
            inputs[kind] = sum(t.untyped_storage().nbytes() for t in {StorageWeakRef(t.untyped_storage()).cdata: t
                                                                      for t in tensors}.values())
        return hook

    def leave(module, args, kwargs, output):
        current[0] = "outside"

    handles = []
    for kind, block in (("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])):
        handles.append(block.register_forward_pre_hook(enter(kind), with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True))
    # As from the second block on: the hidden states already depend on LoRA weights (the first block's would not).
    x = torch.empty(batch, img, 64, device=meta, dtype=dtype, requires_grad=True)
    context = torch.empty(batch, text_tokens, 4096, device=meta, dtype=dtype, requires_grad=True)
    try:
        with CudaAutocast(dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(hidden_states=x, encoder_hidden_states=context,
                  pooled_projections=torch.empty(batch, 768, device=meta, dtype=dtype),
                  timestep=torch.empty(batch, device=meta, dtype=dtype), guidance=torch.empty(batch, device=meta),
                  txt_ids=torch.empty(text_tokens, 3, device=meta), img_ids=torch.empty(img, 3, device=meta),
                  return_dict=False)
    finally:
        for h in handles:
            h.remove()

    def total(kind: str) -> int:
        if checkpointed and kind != "shared":
            return inputs[kind]
        wanted = {kind} if kind != "shared" else None
        return sum(sizes[k] for k, who in owner.items()
                   if (who == wanted if wanted else len(who - {"outside"}) > 1))

    return Saved(total("double"), total("single"), total("shared"), batch * (img + text_tokens))
