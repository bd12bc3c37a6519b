"""The sizes of FLUX.1-dev's Linear layers, and what an adapter on them adds: trainable parameters (LoRA, DoRA,
LoKr as peft builds them), DoRA's extra activations and passing allocation, an EMA's copy. Read by the memory
planner (fluxnb.train.budget), from the layout alone: no model is built.
"""

from __future__ import annotations

from ..config import LoRAConfig

GiB = 2**30
DOUBLE, SINGLE = 19, 38  # FLUX.1-dev's double- and single-stream blocks, in the order they run
WIDTH = 3072  # FLUX.1-dev's hidden size
# FLUX.1-dev's Linear layers per block: name -> (in, out) features.
DOUBLE_LINEARS = {"norm1.linear": (3072, 18432), "norm1_context.linear": (3072, 18432),
                  **{f"attn.{n}": (3072, 3072) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                          "add_v_proj", "to_out.0", "to_add_out")},
                  "ff.net.0.proj": (3072, 12288), "ff.net.2": (12288, 3072),
                  "ff_context.net.0.proj": (3072, 12288), "ff_context.net.2": (12288, 3072)}
SINGLE_LINEARS = {"norm.linear": (3072, 9216), "proj_mlp": (3072, 12288), "proj_out": (15360, 3072),
                  **{f"attn.{n}": (3072, 3072) for n in ("to_q", "to_k", "to_v")}}
EMA_GPU_SHARE = 0.02  # an EMA of the LoRA weights stays on the GPU while its fp32 copy takes at most this of the budget


def adapted(lora: LoRAConfig) -> dict[str, list[tuple[str, int, int]]]:
    """{"double"/"single": [(name, in, out) of each Linear `lora` adapts in one block of that kind]}, chosen as
    peft chooses them for fluxnb.model.lora (from the FLUX layout above, so no model is built)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = PeftLoraConfig(target_modules=lora.target_modules)
    every = config.target_modules == "all-linear"  # peft's shorthand, expanded when it wraps a model
    return {kind: [(n, i, o) for n, (i, o) in linears.items()
                   if every or check_target_module_exists(config, f"{prefix}.0.{n}")]
            for kind, prefix, linears in (("double", "transformer_blocks", DOUBLE_LINEARS),
                                          ("single", "single_transformer_blocks", SINGLE_LINEARS))}


def _params(lora: LoRAConfig, i: int, o: int) -> int:
    """Trainable numbers of an adapted (in, out) Linear: r (in + out), DoRA + out; LoKr as peft shapes it."""
    if lora.type != "lokr":
        return lora.rank * (i + o) + (o if lora.type == "dora" else 0)
    from peft.tuners.lokr.layer import factorization

    (in_m, in_n), (out_l, out_k) = factorization(i), factorization(o)
    w2 = out_k * in_n if lora.rank >= max(out_k, in_n) / 2 else lora.rank * (out_k + in_n)
    return out_l * in_m + w2


def lora_params(lora: LoRAConfig) -> int:
    """Trainable parameters of `lora` on FLUX.1-dev's blocks (see `adapted` and `_params`)."""
    blocks = adapted(lora)
    return sum(count * sum(_params(lora, i, o) for _, i, o in blocks[kind])
               for kind, count in (("double", DOUBLE), ("single", SINGLE)))


def dora_gib_per_token(lora: LoRAConfig) -> tuple[float, float]:
    """(double, single): what DoRA keeps besides LoRA per token in a kept block: the base's and the LoRA's output of
    each adapted Linear, 2 bytes each; in a double block, the costlier of the image and the text tokens' Linears.
    The modulation Linears (norm*) run once per sample."""
    if lora.type != "dora":
        return 0.0, 0.0
    blocks, text = adapted(lora), lambda n: "add" in n or "context" in n
    cost = [sum(4 * o for n, _, o in blocks[kind] if not n.startswith("norm") and keep(n))
            for kind, keep in (("double", lambda n: not text(n)), ("double", text), ("single", lambda n: True))]
    return max(cost[:2]) / GiB, cost[2] / GiB


def dora_transient_gib(lora: LoRAConfig) -> float:
    """DoRA's largest passing allocation, in its widest adapted Linear's forward: peft builds B @ A from an (in, in)
    identity (fp32 + autocast's 16-bit copy), then the 16-bit base weight, the product and their sum, (out, in)
    each, for the norm of W + dW. A single block's proj_out (15360 in) takes 1.6 GiB, an attention projection 0.1."""
    if lora.type != "dora":
        return 0.0
    return max((i * i * (4 + 2) + i * o * 3 * 2 for kind in ("double", "single") for _, i, o in adapted(lora)[kind]),
               default=0) / GiB


def ema_on_gpu(params: int, budget_gib: float) -> bool:
    """Whether an fp32 EMA of `params` LoRA weights stays on the GPU (at most EMA_GPU_SHARE of the budget)."""
    return 4 * params / GiB <= EMA_GPU_SHARE * budget_gib
