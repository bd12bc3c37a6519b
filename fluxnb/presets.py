"""Hardware presets: the blog recipe adjusted to the GPU at hand, picked automatically (notebook 03's form,
fluxnb.nb.forms, edits them).

A preset says how the frozen base is held (NF4, blocks resident or streamed from CPU RAM), the batch split and the
optimizer; every preset trains the same LoRA. Compute dtype is not part of a preset: the hardware decides it (bf16
where the GPU has it, fp16 on a T4). Batches hold 4 samples of 512x768 (1536 image tokens each); at larger sizes
`apply` lowers the batch and accumulates instead, so activation memory stays near a measured level (`batch_tokens`).
What each preset costs in memory and time, measured, is in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .hardware import Hardware


@dataclass(frozen=True)
class Preset:
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    batch_tokens: int = 0  # most image tokens in one batch (activation memory grows with it)


SAMPLES_PER_STEP = 4  # the blog's batch 1 x accumulation 4
SMALL = SAMPLES_PER_STEP * (512 // 16) * (768 // 16)  # 4 x 512x768: 6,144 image tokens
LARGE = 2 * (1024 // 16) ** 2  # 2 x 1024x1024: 8,192 image tokens
_QLORA = {"quantization": "nf4", "prequantized": None, "double_quant": False, "offload_blocks": 0}
_FAST_TRAIN = {"gradient_checkpointing": True, "optimizer": "adamw8bit", "batch_size": SAMPLES_PER_STEP,
               "gradient_accumulation_steps": 1, "compile": "auto"}
PRESETS: dict[str, Preset] = {
    "8-12gb": Preset("8-12 GB (3060, 4060, 4070): QLoRA with every transformer block streamed from CPU RAM "
                     "(needs ~7 GB of free RAM): ~5.4 GiB peak at 512x768, as fast as without streaming on an H100",
                     {**_QLORA, "offload_blocks": 57}, dict(_FAST_TRAIN), SMALL),
    "t4-16gb": Preset("16 GB, free Colab T4: QLoRA in fp16 (a T4 has no bf16), ~11.5 GiB peak. Save the NF4 "
                      "transformer to Drive once (fluxnb.model.save_nf4) and set model.prequantized: quantizing "
                      "FLUX on the fly needs most of Colab's 12.7 GB of RAM", dict(_QLORA), dict(_FAST_TRAIN), SMALL),
    "4090-24gb": Preset("24 GB (4090, 3090): the blog's QLoRA with batches of 4 and compiled blocks: ~11.5 GiB peak "
                        "at 512x768 (the blog's run: ~9 GB, ~41 min for 700 steps)", dict(_QLORA), dict(_FAST_TRAIN),
                        LARGE),
    "h100-80gb": Preset("40-80 GB (A100, H100): the same QLoRA, plain AdamW (8-bit would save ~30 MB for 4.7 M "
                        "LoRA weights): 0.7 s per 4-sample step on an H100, 5x the blog's recipe",
                        dict(_QLORA), {**_FAST_TRAIN, "optimizer": "adamw"}, LARGE),
}
TINY = "tiny-cpu"


def pick(hw: Hardware) -> str:
    """The preset for this machine, by GPU memory."""
    if hw.profile == "tiny" or hw.gpu is None:
        return TINY
    gib = hw.gpu.total_gib
    return "8-12gb" if gib < 14 else "t4-16gb" if gib < 20 else "4090-24gb" if gib < 40 else "h100-80gb"


def batch_for(width: int, height: int, batch_tokens: int = SMALL) -> int:
    """The largest divisor of SAMPLES_PER_STEP whose batch holds at most `batch_tokens` image tokens (else 1)."""
    tokens = (width // 16) * (height // 16)
    return next((b for b in (4, 2) if b * tokens <= batch_tokens), 1)


def apply(config: RunConfig, name: str) -> RunConfig:
    """A validated copy of `config` with the preset's settings (the tiny preset changes nothing)."""
    if name == TINY:
        return config
    preset = PRESETS[name]
    batch = batch_for(config.data.width, config.data.height, preset.batch_tokens)
    train = {**preset.train, "batch_size": batch, "gradient_accumulation_steps": SAMPLES_PER_STEP // batch}
    return config.replace(model=preset.model, train=train)


def matching(config: RunConfig, hw: Hardware | None = None) -> str:
    """The preset whose every setting `config` has (this machine's own if several do), or "custom"."""
    if config.profile == "tiny":
        return TINY
    found = []
    for name in PRESETS:
        preset_config = apply(config, name)
        if (preset_config.model, preset_config.train) == (config.model, config.train):
            found.append(name)
    if hw is not None and pick(hw) in found:  # t4-16gb and 4090-24gb differ only in the dtype the GPU picks
        return pick(hw)
    return found[0] if found else "custom"


def apply_in_place(config: RunConfig, name: str) -> None:
    """Like `apply`, but into the existing dataclasses, so forms and other holders of them see the change."""
    fresh = apply(config, name)
    for section in ("model", "train"):
        target, source = getattr(config, section), getattr(fresh, section)
        for key, value in vars(source).items():
            setattr(target, key, value)
