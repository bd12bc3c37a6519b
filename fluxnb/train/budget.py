"""The memory-budget policy: the fastest training layout of FLUX.1-dev (NF4 by default) that fits a GPU memory budget.

    plan = choose(14.7, width=512, height=768, compiled=False)   # a T4's memory, as torch reports it; no compile
    plan.settings()   # -> model.offload_blocks, train.batch_size / accumulation / keep_activations / optimizer
    print(plan.table())                            # what was chosen and why (notebook 03)

Per block of the 57, three choices: its frozen weights resident on the GPU or streamed from CPU RAM
(fluxnb.model.offload), its activations kept for the backward pass or recomputed there (gradient checkpointing);
and one for the step: the batch split of its 4 samples. The estimate adds up per-block costs, each per token (image
+ text tokens of a batch): weights are the format's bytes (`WEIGHT_BYTES`: NF4 0.5 + 4/64 per parameter, FP8 1 +
4 per output channel, 16-bit 2); a checkpointed block keeps its two inputs (6 KiB per token); the rest (LoRA,
optimizer, embeddings, the output layers, gradients in flight) grows with the tokens of a batch. The activation
figures were measured with NF4; the FP8 layer keeps nothing more for the backward pass (fluxnb.model.fp8), so
they stand for it too until benchmarks/fp8_step.py measures it (FP8: compute capability 8.9 and up; no preset
chooses it yet). What a block that keeps its activations holds depends on how it runs:
- compiled (torch.compile, compute capability 8.0 and up): ~88 KiB per token, fitted to the peaks measured at
  512x768 and 1024x1024 (BENCHMARKS.md); the compiler rebuilds one checkpointed block at a time;
- eager (compile off: a T4, or no Triton): what autograd saves, counted at FLUX.1-dev's sizes on the CPU
  (tests/saved_activations.py: 120 KiB per token in a double-stream block, 109 in a single-stream one, fp16;
  within 3% of the H200's eager peaks), plus what the eager backward holds besides (fitted to those peaks).
Speed, as measured: compiled, a recomputed block costs ~2.8 ms per step at 512x768 and batch 4 on an H200 (the
recomputation is the compiler's: fluxnb.train.speed); eager, keeping 8 or 18 blocks' activations bought nothing
measurable (1.19 s per step with none kept, 1.12 with 8, 1.18 with 18), so eager plans keep none. A streamed block
costs almost nothing at batch 4 (its copy hides behind the compute), a smaller batch a lot. So the policy takes
the largest batch that fits with every block streamed and checkpointed, then (compiled) spends what is left on
kept activations (the last blocks, whose backward runs first), then on resident blocks; an FP8 or 16-bit base,
whose copies would not hide, on resident blocks first (RESIDENT_FIRST). The first optimizer step
measures the real peak; `adjust` moves one notch toward memory if it is over (fluxnb.train.speed.fit_budget).
Options: DoRA (lora.type="dora") keeps two more outputs per adapted Linear (`dora_gib_per_token`: +46 / +36 KiB
per token in a double / single block for the attention preset) and builds each B @ A in passing
(`dora_transient_gib`); its magnitudes are 2.3 MB. An EMA (train.ema_decay) adds its fp32 copy where it is on the
GPU (`ema_on_gpu`; the blog's rank 4: 19 MB). LoKr trains no NF4 base (fluxnb.model.lora): no preset plans it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from ..config import LoRAConfig
from ..model.offload import pick_blocks
from .adapter_sizes import (  # noqa: F401 (EMA_GPU_SHARE, adapted: read through fluxnb.train.budget too)
    DOUBLE,
    DOUBLE_LINEARS,
    EMA_GPU_SHARE,
    SINGLE,
    SINGLE_LINEARS,
    WIDTH,
    GiB,
    adapted,
    dora_gib_per_token,
    dora_transient_gib,
    ema_on_gpu,
    lora_params,
)
SAMPLES_PER_STEP = 4  # the blog's batch 1 x accumulation 4
LARGEST_WIDTH = 5 * WIDTH  # a single-stream block's attention and MLP outputs, joined: a step's largest tensor
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64 weights
# Frozen weights by model.quantization: bytes per parameter, bytes per output channel (FP8's fp32 scale).
WEIGHT_BYTES = {"nf4": (NF4_BYTES_PER_PARAM, 0), "fp8": (1.0, 4), "none": (2.0, 0)}
# Parameters outside the 57 blocks (embedders, final norm, output projection): NF4 quantizes their Linear layers,
# FP8 keeps them 16-bit (fluxnb.model.fp8.KEEP), as does "none". Counted on FLUX.1-dev's layout (meta device).
OUTSIDE_PARAMS = 64_124_992
# Fitted to the measured peaks (BENCHMARKS.md, "Memory-budget policy"), per token = image + text tokens of a batch.
CHECKPOINTED_GIB_PER_TOKEN = 2 * WIDTH / GiB  # the block's input, bf16
KEPT_GIB_PER_TOKEN = 8.61e-5  # compiled: everything a block's backward needs, kept (~88 KiB per token)
BASE_GIB, BASE_GIB_PER_TOKEN = 0.17, 3.83e-4  # LoRA + optimizer + everything outside the blocks
# Eager: what autograd saves per block (counted, tests/saved_activations.py; fp16, the larger of fp16 and bf16),
# and what else the eager backward holds at its peak (fitted: 6.43 GiB, 57 blocks streamed, none kept, batch 4).
EAGER_KEPT_GIB_PER_TOKEN = {"double": 120 * 2**10 / GiB, "single": 109 * 2**10 / GiB}
EAGER_EXTRA_GIB_PER_TOKEN = 1.2e-4
ADAMW8BIT_SAVES = 6  # bytes per LoRA parameter: fp32 Adam moments (8 B) vs 8-bit ones (2 B)
# Formats whose blocks get memory before kept activations do. A streamed block crosses PCIe twice per step; NF4's
# 6.2 GiB take ~0.27 s at the H200's ~50 GB/s, hidden behind a 0.5-0.6 s step. FP8's 11 GiB take twice that,
# while its matmuls run at twice NF4's rate (0.3-0.35 s hoped for): the copies would set the pace (on a 4090's
# PCIe 4, ~1 s). So an FP8 (or 16-bit) base is resident where it fits, streamed only below that.
RESIDENT_FIRST = ("fp8", "none")


def block_gib(quantization: str = "nf4") -> list[float]:
    """Frozen weights of each of the 57 blocks in GiB, as `quantization` stores them (a double-stream block is
    2.4 times a single-stream one)."""
    per_param, per_channel = WEIGHT_BYTES[quantization]
    double = sum(i * o * per_param + o * per_channel for i, o in DOUBLE_LINEARS.values()) / GiB
    single = sum(i * o * per_param + o * per_channel for i, o in SINGLE_LINEARS.values()) / GiB
    return [double] * DOUBLE + [single] * SINGLE


def outside_gib(quantization: str = "nf4") -> float:
    """The frozen weights outside the blocks, in GiB (always resident)."""
    return OUTSIDE_PARAMS * (NF4_BYTES_PER_PARAM if quantization == "nf4" else 2.0) / GiB


def resident_gib(quantization: str = "nf4") -> float:
    """Every frozen weight of FLUX.1-dev on the GPU (nothing streamed): NF4 6.2 GiB, FP8 11.2 GiB (12.0 GB),
    16-bit 22.2 GiB."""
    return sum(block_gib(quantization)) + outside_gib(quantization)


def margin_gib(budget: float, batch_tokens: int = 0) -> float:
    """Headroom left under the budget for the allocator's fragmentation (reserved above allocated): 3% of it, at
    least 0.3 GiB, and at least twice the step's largest tensor, batch_tokens (image + text tokens of a batch) x
    LARGEST_WIDTH in bf16. Measured (BENCHMARKS.md, 2026-12-02): at an 8 GiB cap, 1024x1024 at batch 2 ran out
    of memory with 0.42 GiB reserved but not usable for its 0.21-0.26 GiB requests (1.00 GiB without expandable
    segments), where the estimate had left 0.38 GiB; at 512x768 the caps of 6, 14.7 and 23.6 GiB held."""
    return max(0.3, 0.03 * budget, 2 * batch_tokens * LARGEST_WIDTH * 2 / GiB)


@dataclass(frozen=True)
class Layout:
    batch: int
    streamed: int  # blocks whose frozen weights stream from CPU RAM (spread by pick_blocks)
    kept: int  # the last blocks, which keep their activations instead of being checkpointed
    compiled: bool = True  # blocks compiled by torch.compile (False: eager, e.g. on a T4)
    quantization: str = "nf4"  # how the frozen weights are stored (model.quantization)
    dora: tuple[float, float] = (0.0, 0.0)  # DoRA's extra GiB per token in a kept double / single block
    extra_gib: float = 0.0  # what the options add at the peak: an EMA on the GPU, DoRA's passing allocation

    def peak_gib(self, tokens: int) -> float:
        """Estimated peak GPU memory of a training step; `tokens` = image + text tokens of one sample."""
        sizes, bt = block_gib(self.quantization), self.batch * tokens
        streamed = set(pick_blocks(len(sizes), self.streamed))
        weights = sum(s for i, s in enumerate(sizes) if i not in streamed)
        in_flight = max((sizes[i] for i in streamed), default=0.0)  # the block being copied in
        checkpointed = len(sizes) - self.kept
        outside = outside_gib(self.quantization) - outside_gib("nf4")  # BASE_GIB was fitted with NF4's
        base = (BASE_GIB + outside + self.extra_gib + BASE_GIB_PER_TOKEN * bt + weights + in_flight
                + bt * (checkpointed * CHECKPOINTED_GIB_PER_TOKEN + self._kept(dict(zip(("double", "single"),
                                                                                        self.dora)))))
        if self.compiled:  # kept blocks' backward first, then one rebuilt at a time
            return base + bt * max(self.kept, 1 if checkpointed else 0) * KEPT_GIB_PER_TOKEN
        return base + bt * (self._kept(EAGER_KEPT_GIB_PER_TOKEN) + EAGER_EXTRA_GIB_PER_TOKEN)

    def _kept(self, per_token: dict[str, float]) -> float:
        """GiB per token of the kept blocks (the last ones) and of the one checkpointed block rebuilt at a time."""
        kinds = ["double"] * DOUBLE + ["single"] * SINGLE
        checkpointed = len(kinds) - self.kept
        return (sum(per_token[k] for k in kinds[checkpointed:])
                + max((per_token[k] for k in kinds[:checkpointed]), default=0.0))


@dataclass(frozen=True)
class Plan:
    budget_gib: float
    tokens: int  # per sample
    layout: Layout
    optimizer: str
    fits: bool
    lora_params: int
    host_gib: float | None = None  # CPU RAM the streamed weights were allowed
    size: str = ""  # what was planned for: "512x768, 77 text tokens"
    ema: bool = False  # an EMA of the LoRA weights is kept (train.ema_decay > 0)

    @property
    def estimate_gib(self) -> float:
        return self.layout.peak_gib(self.tokens)

    @property
    def margin_gib(self) -> float:
        return margin_gib(self.budget_gib, self.layout.batch * self.tokens)

    def settings(self) -> dict[str, dict]:
        """The config fields this plan sets: {"model": {...}, "train": {...}}."""
        lay = self.layout
        return {"model": {"offload_blocks": lay.streamed, "quantization": lay.quantization},
                "train": {"batch_size": lay.batch, "gradient_accumulation_steps": SAMPLES_PER_STEP // lay.batch,
                          "gradient_checkpointing": lay.kept < len(block_gib()), "keep_activations": lay.kept,
                          "optimizer": self.optimizer, "memory_budget_gib": self.budget_gib}}

    def rows(self) -> list[tuple[str, str, str]]:
        """(setting, chosen, why) for notebook 03's table."""
        lay, n = self.layout, len(block_gib())
        saved = ADAMW8BIT_SAVES * self.lora_params / GiB
        fit = (f"estimated peak {self.estimate_gib:.1f} GiB of {self.budget_gib:.1f}" if self.fits else
               f"estimated peak {self.estimate_gib:.1f} GiB: over the {self.budget_gib:.1f} GiB budget even so")
        kept = (f"{lay.kept} of {n} blocks keep them, {n - lay.kept} recompute them" if lay.kept < n else
                f"all {n} blocks keep them (nothing recomputed)")
        why_kept = ("each kept block saves rebuilding its activations in the backward pass, for ~88 KiB per token"
                    if lay.compiled else "without torch.compile keeping activations bought no time (measured), "
                    "for ~110 KiB per token and block")
        streamed = (f"{lay.streamed} of {n} blocks from CPU RAM" if lay.streamed else f"none: all {n} resident")
        return [
            ("batch", f"{lay.batch} x {SAMPLES_PER_STEP // lay.batch} accumulation",
             "the largest batch that fits: one pass over 4 samples costs far less than 4 passes over 1"),
            ("activations", kept, why_kept),
            ("weights streamed", streamed,
             "streaming costs little at batch 4 (the copy hides behind compute), so "
             + ("memory goes to activations first" if lay.compiled else "blocks stay resident only where memory is left")
             + (f"; at most {self.host_gib:g} GiB of CPU RAM for them" if self.host_gib is not None else "")),
            ("optimizer", self.optimizer,
             f"8-bit AdamW would save {saved * 1024:.0f} MiB ({100 * saved / self.budget_gib:.2f}% of the budget)"
             + (": not worth its slower step" if self.optimizer == "adamw" else "")),
            *([("EMA", "on the GPU" if ema_on_gpu(self.lora_params, self.budget_gib) else "in CPU RAM",
                f"an fp32 copy of the LoRA, {4 * self.lora_params / 2**20:.0f} MiB: on the GPU up to "
                f"{100 * EMA_GPU_SHARE:g}% of the budget, else in CPU RAM (copied there after each step)")]
              if self.ema else []),
            ("memory", fit, f"planned for {self.size} ({self.tokens} tokens per sample), "
             f"{'compiled' if lay.compiled else 'eager'} blocks, {_FORMATS[lay.quantization]} weights"
             + (", DoRA's extra activations and its passing B @ A" if any(lay.dora) else "")
             + f"; budget minus {self.margin_gib:.1f} GiB for the allocator's fragmentation"),
        ]

    def table(self) -> str:
        rows = [("setting", "chosen", "why"), *self.rows()]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


_FORMATS = {"nf4": "NF4", "fp8": "FP8", "none": "16-bit"}


def tokens_per_sample(width: int, height: int, text_tokens: int, control: bool = False) -> int:
    """What one sample puts through each block: FLUX packs 2x2 patches of the VAE's /8 latent into image tokens,
    then the text's; FLUX.1-Kontext-dev's `control` image (the pair's input, same size) adds as many again."""
    return (width // 16) * (height // 16) * (2 if control else 1) + text_tokens


def streamed_gib(count: int, quantization: str = "nf4") -> float:
    """CPU RAM that streaming `count` blocks takes (their frozen weights, pinned)."""
    sizes = block_gib(quantization)
    return sum(sizes[i] for i in pick_blocks(len(sizes), count))


def choose(budget_gib: float, width: int = 512, height: int = 768, text_tokens: int = 77,
           lora: LoRAConfig | None = None, host_gib: float | None = None, compiled: bool = True,
           quantization: str = "nf4", ema: bool = False, control: bool = False) -> Plan:
    """The fastest layout whose estimated peak fits `budget_gib` (see the module docstring for the order).
    host_gib: CPU RAM the streamed weights may take (None: no limit; 0: every block resident). compiled: whether
    the blocks run compiled (fluxnb.run.hardware.Hardware.compiles); eager, no block keeps its activations.
    quantization: the frozen weights' format (model.quantization: "nf4", "fp8", "none"). ema: an EMA of the LoRA
    weights is kept (train.ema_decay > 0). control: FLUX.1-Kontext-dev, each sample with its control image."""
    tokens, n = tokens_per_sample(width, height, text_tokens, control), len(block_gib())
    size = f"{width}x{height}{' + its control image' if control else ''}, {text_tokens} text tokens"
    most = n if host_gib is None else _most(lambda s: streamed_gib(s, quantization) <= host_gib, n)
    lora = lora or LoRAConfig()
    params = lora_params(lora)
    optimizer = "adamw" if ADAMW8BIT_SAVES * params / GiB < 0.01 * budget_gib else "adamw8bit"
    ema_gib = 4 * params / GiB if ema and ema_on_gpu(params, budget_gib) else 0.0
    lay = functools.partial(Layout, compiled=compiled, quantization=quantization, dora=dora_gib_per_token(lora),
                            extra_gib=ema_gib + dora_transient_gib(lora))
    for batch in (b for b in (4, 2, 1) if SAMPLES_PER_STEP % b == 0):
        margin = margin_gib(budget_gib, batch * tokens)
        usable = budget_gib - margin
        if lay(batch, most, 0).peak_gib(tokens) > usable:
            continue
        first = quantization in RESIDENT_FIRST
        resident = _most(lambda r: lay(batch, most - r, 0).peak_gib(tokens) <= usable, most) if first else 0
        kept = _most(lambda k: lay(batch, most - resident, k).peak_gib(tokens) <= usable, n) if compiled else 0
        if not first:  # A resident NF4 block saves little (its copy hides behind the compute): it gets memory only
            # while twice the margin stays free, so a plan is not pushed to the budget's edge for a gain that small.
            room = usable - margin
            resident = _most(lambda r: lay(batch, most - r, kept).peak_gib(tokens) <= room, most)
        return Plan(budget_gib, tokens, lay(batch, most - resident, kept), optimizer, True, params, host_gib, size, ema)
    return Plan(budget_gib, tokens, lay(1, most, 0), optimizer, False, params, host_gib, size, ema)


def _most(ok, top: int) -> int:
    """The largest k in 0..top with ok(k) (ok is monotone: True up to some k, then False)."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def adjust(layout: Layout, peak_gib: float, budget_gib: float, tokens: int) -> Layout | None:
    """One notch toward memory when a measured peak is over the budget's usable part, else None: fewer kept
    activations, enough to cover the excess by the estimate's per-block cost, and one more. (Kept activations are
    always spent before resident blocks, and one kept block is free, so a plan over budget has some to give back;
    the batch and the streamed blocks stay: changing those means another data loader or a weight reload.)"""
    excess = peak_gib - (budget_gib - margin_gib(budget_gib, layout.batch * tokens))
    if excess <= 0 or not layout.kept:
        return None
    kept = (KEPT_GIB_PER_TOKEN if layout.compiled else min(EAGER_KEPT_GIB_PER_TOKEN.values()))
    per_kept = layout.batch * tokens * (kept - CHECKPOINTED_GIB_PER_TOKEN)
    return replace(layout, kept=max(0, layout.kept - math.ceil(excess / per_kept) - 1))
