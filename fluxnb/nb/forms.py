"""Notebook 03's settings form: a hardware preset chooser, the layout its memory budget chose and why (one
short table), then the LoRA, training and resolution fields.

The presets and the budget policy are fluxnb.train.presets and fluxnb.train.budget; this is only their form.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from ..config import LORA_TARGETS, LORA_TYPES, RunConfig
from ..model.lora import nf4_problem
from ..run.hardware import Hardware
from ..train.presets import PRESETS, TINY, apply_in_place, matching, plan, plan_if_unplanned
from .widgets import config_form

TRAIN_FIELDS = ["learning_rate", "max_train_steps", "batch_size", "gradient_accumulation_steps", "sample_every",
                "checkpoint_every", "validation_samples", "validate_every", "ema_decay"]


def training_form(config: RunConfig, hw: Hardware):
    """The notebook's settings form: preset, LoRA type/rank/alpha/targets, lr, steps, accumulation, resolution,
    sample/checkpoint intervals, EMA decay. Edits go straight into `config` (call run.save() to keep them)."""
    current = plan_if_unplanned(config, hw) or matching(config, hw)  # a new run gets this machine's preset
    options = [*PRESETS, TINY] + (["custom"] if current == "custom" else [])
    chooser = W.Dropdown(options=options, value=current, description="hardware preset",
                         style={"description_width": "200px"}, layout=W.Layout(width="520px"))
    note, forms = W.HTML(), W.VBox()

    def refresh(*_: Any) -> None:
        if chooser.value in PRESETS or chooser.value == TINY:
            apply_in_place(config, chooser.value, hw)
        if chooser.value in PRESETS:
            description = html.escape(PRESETS[chooser.value].description)
            note.value = f"<i>{description}</i>" + plan_table(config, chooser.value, hw)
        else:
            note.value = f"<i>{html.escape(hw.describe())}</i>"
        forms.children = [
            config_form(config.lora, ["type", "rank", "alpha", "targets"], "LoRA",
                        choices={"type": LORA_TYPES,
                                 "targets": (*LORA_TARGETS, *([config.lora.targets]
                                                              if config.lora.targets not in LORA_TARGETS else []))},
                        check=lambda lora: nf4_problem(lora, config.model.quantization)),
            config_form(config.train, TRAIN_FIELDS, "Training"),
            config_form(config.data, ["width", "height"],
                        "Resolution (the latents of notebook 02 were cached at this size; change it there)"),
        ]

    chooser.observe(refresh, names="value")
    refresh()
    return W.VBox([chooser, note, forms])


def plan_table(config: RunConfig, name: str, hw: Hardware) -> str:
    """The budget policy's choice for this preset, as an HTML table: setting, chosen, why."""
    chosen = plan(config, name, hw)
    rows = "".join(f"<tr><td>{a}</td><td><b>{html.escape(b)}</b></td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in chosen.rows())
    size = f"{config.data.width}x{config.data.height}"  # the layout depends on it: say which one it is for
    return (f"<table><tr><th>budget {chosen.budget_gib:g} GiB, planned for {size} images</th><th>chosen</th>"
            f"<th>why</th></tr>{rows}</table>")
