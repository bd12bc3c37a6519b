"""Notebook 03's settings form: a hardware preset chooser, the layout its memory budget chose and why (one
short table), then the LoRA, training and resolution fields.

The presets and the budget policy are fluxnb.train.presets and fluxnb.train.budget; this is only their form.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from ..config import BASES, LORA_TARGETS, LORA_TYPES, OPTIMIZERS, WEIGHTING_SCHEMES, RunConfig
from ..model.lora import nf4_problem
from ..run.hardware import Hardware
from ..train.presets import PRESETS, TINY, apply_in_place, describe, matching, plan, plan_if_unplanned
from ..train.step import optimizer_note
from .widgets import config_form

TRAIN_FIELDS = ["optimizer", "learning_rate", "max_train_steps", "batch_size", "gradient_accumulation_steps",
                "caption_dropout", "weighting_scheme", "sigmoid_scale", "ema_decay", "sample_every", "checkpoint_every",
                "validation_samples", "validate_every"]


def training_form(config: RunConfig, hw: Hardware):
    """The notebook's settings form: preset, LoRA type/rank/alpha/targets, lr, steps, accumulation, resolution,
    sample/checkpoint intervals, EMA decay. Edits go straight into `config` (call run.save() to keep them)."""
    current = plan_if_unplanned(config, hw) or matching(config, hw)  # a new run gets this machine's preset
    options = [*PRESETS, TINY] + (["custom"] if current == "custom" else [])
    chooser = W.Dropdown(options=options, value=current, description="hardware preset",
                         style={"description_width": "200px"}, layout=W.Layout(width="520px"))
    note, forms = W.HTML(), W.VBox()

    def describe_choice() -> None:  # the preset's sentence (its base) and plan (its optimizer): after those edits too
        if chooser.value in PRESETS:
            description = html.escape(describe(config, chooser.value))
            note.value = f"<i>{description}</i>" + plan_table(config, chooser.value, hw)
        else:
            note.value = f"<i>{html.escape(hw.describe())}</i>"

    def refresh(*_: Any) -> None:
        if chooser.value in PRESETS or chooser.value == TINY:
            apply_in_place(config, chooser.value, hw)
        describe_choice()
        forms.children = [
            config_form(config.lora, ["type", "rank", "alpha", "targets"], "LoRA",
                        choices={"type": LORA_TYPES,
                                 "targets": (*LORA_TARGETS, *([config.lora.targets]
                                                              if config.lora.targets not in LORA_TARGETS else []))},
                        check=lambda lora: nf4_problem(lora, config.model.quantization)),
            training_fields(config, then=describe_choice),
            config_form(config.data, ["width", "height"],
                        "Resolution (the latents of notebook 02 were cached at this size; change it there)"),
            base_form(config, then=describe_choice),
        ]

    chooser.observe(refresh, names="value")
    refresh()
    return W.VBox([chooser, note, forms])


def training_fields(config: RunConfig, then=lambda: None) -> W.VBox:
    """The training fields, and under them a warning when learning_rate does not fit the optimizer (Prodigy's is a
    multiplier, 1.0 typical; Adam's a step size, ~1e-4), redrawn after every edit."""
    form = config_form(config.train, TRAIN_FIELDS, "Training",
                       choices={"optimizer": OPTIMIZERS, "weighting_scheme": WEIGHTING_SCHEMES})
    note = W.HTML()

    def warn() -> None:
        text = optimizer_note(config.train)
        note.value = f"<span style='color:#b00'>{html.escape(text)}</span>" if text else ""

    def refresh(*_: Any) -> None:  # observers run in order: config_form's own has written the value already
        warn()
        then()

    for widget in form.children:
        if isinstance(widget, W.ValueWidget) and not isinstance(widget, W.HTML):
            widget.observe(refresh, names="value")
    warn()
    return W.VBox([*form.children, note])


def base_form(config: RunConfig, then=lambda: None) -> W.VBox:
    """model.base: which FLUX.1 the LoRA is for. model_id follows it (RunConfig.replace) unless it names a local
    copy. The caches of notebooks 01 and 02 were made with the base: another one means running them again."""
    title = W.HTML("<b>Base model (notebooks 01 and 02 cached its text embeddings and latents: changing it means "
                   "running them again)</b>")
    chooser = W.Dropdown(options=list(BASES), value=config.model.base, description="base",
                         style={"description_width": "200px"}, layout=W.Layout(width="520px"))

    def change(*_: Any) -> None:
        fresh = config.replace(model={"base": chooser.value}).model  # validated; model_id along with it
        for key, value in vars(fresh).items():
            setattr(config.model, key, value)
        then()

    chooser.observe(change, names="value")
    return W.VBox([title, chooser])


def plan_table(config: RunConfig, name: str, hw: Hardware) -> str:
    """The budget policy's choice for this preset, as an HTML table: setting, chosen, why."""
    chosen = plan(config, name, hw)
    prodigy = ("optimizer", "prodigy", "train.optimizer (the preset's choice between 8-bit and plain AdamW does "
                                       "not apply); Prodigy keeps 4 fp32 numbers per LoRA weight")
    rows = "".join(f"<tr><td>{a}</td><td><b>{html.escape(b)}</b></td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in (prodigy if row[0] == "optimizer" and config.train.optimizer == "prodigy" else row
                                   for row in chosen.rows()))
    size = f"{config.data.width}x{config.data.height}"  # the layout depends on it: say which one it is for
    return (f"<table><tr><th>budget {chosen.budget_gib:g} GiB, planned for {size} images</th><th>chosen</th>"
            f"<th>why</th></tr>{rows}</table>")
