"""Hardware presets: the blog recipe adjusted to the GPU at hand, picked automatically, editable in a form.

Peak GPU memory and time of the blog recipe at 512x768, batch 1, on an H100 (BENCHMARKS.md, 2026-11-22): NF4 + LoRA
r4 + gradient checkpointing + 8-bit AdamW 7.94 GiB; with double quantization 7.43 GiB but ~13% slower per step;
plain bf16 LoRA 27.54 GiB and ~1.4x faster (DESIGN.md). Compute dtype is not part of a preset: the
hardware decides it (bf16 where the GPU has it, fp16 on a T4).
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


# Double quantization (the 4-bit scales stored in 8 bits) saves 0.5 GiB but cost 13-17% more time per step on an
# H100 (benchmarks/train_step.py): worth it only where those 0.5 GiB decide whether training fits.
_QLORA = {"quantization": "nf4", "prequantized": None, "double_quant": False}
_BLOG_TRAIN = {"gradient_checkpointing": True, "optimizer": "adamw8bit", "batch_size": 1,
               "gradient_accumulation_steps": 4}
PRESETS: dict[str, Preset] = {
    "12gb": Preset("12 GB (3060, 4070): QLoRA (NF4 + double quantization), gradient checkpointing, 8-bit AdamW: "
                   "~7.4 GiB peak at 512x768", {**_QLORA, "double_quant": True}, dict(_BLOG_TRAIN)),
    "t4-16gb": Preset("16 GB, free Colab T4: the same QLoRA in fp16 (a T4 has no bf16), about 4 h for 700 steps. "
                      "Save the NF4 transformer to Drive once (fluxnb.quant.save_nf4) and set model.prequantized: "
                      "quantizing FLUX on the fly needs most of Colab's 12.7 GB of RAM", dict(_QLORA), dict(_BLOG_TRAIN)),
    "4090-24gb": Preset("24 GB (4090, 3090): the blog's recipe (its 4090 run: ~9 GB, ~41 min for 700 steps): "
                        "~7.9 GiB peak at 512x768", dict(_QLORA), dict(_BLOG_TRAIN)),
    "h100-80gb": Preset("40-80 GB (A100, H100): plain bf16 LoRA, no quantization: ~28 GiB, 1.4x faster per step; "
                        "8-bit AdamW would save only ~30 MB for 4.7 M LoRA weights, so plain AdamW",
                        {"quantization": "none", "prequantized": None, "double_quant": False},
                        {**_BLOG_TRAIN, "optimizer": "adamw"}),
}
TINY = "tiny-cpu"


def pick(hw: Hardware) -> str:
    """The preset for this machine, by GPU memory."""
    if hw.profile == "tiny" or hw.gpu is None:
        return TINY
    gib = hw.gpu.total_gib
    return "12gb" if gib < 14 else "t4-16gb" if gib < 20 else "4090-24gb" if gib < 40 else "h100-80gb"


def apply(config: RunConfig, name: str) -> RunConfig:
    """A validated copy of `config` with the preset's settings (the tiny preset changes nothing)."""
    if name == TINY:
        return config
    preset = PRESETS[name]
    return config.replace(model=preset.model, train=preset.train)


def matching(config: RunConfig, hw: Hardware | None = None) -> str:
    """The preset whose every setting `config` has (this machine's own if several do), or "custom"."""
    found = [name for name, preset in PRESETS.items()
             if all(getattr(config.model, k) == v for k, v in preset.model.items())
             and all(getattr(config.train, k) == v for k, v in preset.train.items())]
    if config.profile == "tiny":
        return TINY
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


TRAIN_FIELDS = ["learning_rate", "max_train_steps", "gradient_accumulation_steps", "sample_every", "checkpoint_every"]


def training_form(config: RunConfig, hw: Hardware):
    """The notebook's settings form: preset, LoRA rank/alpha/targets, lr, steps, accumulation, resolution,
    sample/checkpoint intervals. Edits go straight into `config` (call run.save() to keep them)."""
    import ipywidgets as W

    from .config import LORA_PRESETS
    from .widgets import config_form

    current = matching(config, hw)
    options = [*PRESETS, TINY] + (["custom"] if current == "custom" else [])
    chooser = W.Dropdown(options=options, value=current, description="hardware preset",
                         style={"description_width": "200px"}, layout=W.Layout(width="520px"))
    note, forms = W.HTML(), W.VBox()

    def refresh(*_: Any) -> None:
        if chooser.value in PRESETS or chooser.value == TINY:
            apply_in_place(config, chooser.value)
        note.value = f"<i>{PRESETS[chooser.value].description if chooser.value in PRESETS else hw.describe()}</i>"
        forms.children = [
            config_form(config.lora, ["rank", "alpha", "targets"], "LoRA",
                        choices={"targets": (*LORA_PRESETS, *([config.lora.targets]
                                                              if config.lora.targets not in LORA_PRESETS else []))}),
            config_form(config.train, TRAIN_FIELDS, "Training"),
            config_form(config.data, ["width", "height"],
                        "Resolution (the latents of notebook 02 were cached at this size; change it there)"),
        ]

    chooser.observe(refresh, names="value")
    refresh()
    return W.VBox([chooser, note, forms])
