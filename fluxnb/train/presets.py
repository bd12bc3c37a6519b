"""Hardware presets: named memory budgets, one per class of GPU, picked automatically (notebook 03's form,
fluxnb.nb.forms, edits them).

A preset is a budget in GiB (the card's memory as torch reports it) and a sentence for the form; the layout that
fits it (blocks resident or streamed from CPU RAM, checkpointed or keeping their activations, the batch split,
the optimizer) is chosen by fluxnb.train.budget for the image size, and shown with its reasons. Every preset trains the
same NF4 base and the same LoRA on 4 samples per optimizer step. Compute dtype is not part of a preset: the
hardware decides it (bf16 where the GPU has it, fp16 on a T4). What each costs in memory and time, measured, is
in BENCHMARKS.md, on FLUX.1-dev; FLUX.1-Krea-dev (model.base) has its architecture, so the same numbers hold.
A preset picks 8-bit or plain AdamW for memory; Prodigy (train.optimizer) is a choice of method, and stays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import RunConfig
from ..run.hardware import Hardware
from . import budget


@dataclass(frozen=True)
class Preset:
    description: str
    budget_gib: float  # the card's memory; the policy keeps a margin under it (fluxnb.train.budget.margin_gib)
    host_gib: float | None = None  # CPU RAM that streamed weights may take (None: no limit; 0: none streamed)
    compiled: bool = True  # how its GPUs run the blocks when no GPU is at hand to ask (a T4: eager)


SAMPLES_PER_STEP = budget.SAMPLES_PER_STEP
_QLORA = {"quantization": "nf4", "double_quant": False}  # a pre-quantized NF4 folder (model.prequantized) stays
PRESETS: dict[str, Preset] = {
    "8-12gb": Preset("8-12 GB (3060, 4060, 4070): planned for 6 GiB. At 512x768 every block streams from CPU RAM "
                     "(6.3 GiB of pinned RAM, measured), batches of 4: 5.44 GiB, 0.60 s per 4-sample step in a "
                     "6 GiB cap on an H200 (4.0-4.9x the blog's recipe in two runs on 2026-12-03, each against its "
                     "faster reference, 2.37 and 2.96 s; the machine drifts by ±15%). At 1024x1024, batches of 1 (an "
                     "8 GiB budget there: 7.5 GiB, 2.0-2.2 s, 1.8x the recipe in two other runs that day)", 6.0),
    "t4-16gb": Preset("16 GB, free Colab T4: planned for 14.7 GiB with every block resident (streaming would pin "
                      "6.3 GiB of Colab's 12.7 GB of RAM). QLoRA in fp16 (a T4 has no bf16), batches of 4, every "
                      "block recomputed at 512x768 (~12.5 GiB, estimated; without torch.compile kept activations "
                      "bought no time). torch.compile stays off on a T4 (train.compile='auto'; 'on' to try it: "
                      "Triton supports sm_75 poorly and the step is bound by arithmetic). Save the NF4 transformer "
                      "to Drive once (fluxnb.model.save_nf4) and set model.prequantized: quantizing FLUX on the fly "
                      "needs most of Colab's RAM", 14.7, host_gib=0.0, compiled=False),
    "4090-24gb": Preset("24 GB (4090, 3090): planned for 23.6 GiB. Batches of 4, compiled blocks, blocks streamed and "
                        "the last 34 keep their activations at 512x768: 21.4 GiB, 0.52-0.53 s per 4-sample step "
                        "in a 23.6 GiB cap on an H200 (4.4-5.7x the blog's recipe in two runs on 2026-12-03, each "
                        "against its faster reference, 2.37 and 2.96 s; the blog's 4090 run: ~9 GB, ~41 min for 700 "
                        "steps)", 23.6),
    "h100-80gb": Preset("40-80 GB (A100, H100, H200): planned for 80 GiB (or the card's memory). At 512x768 every "
                        "block resident, none recomputed, fused AdamW: 40.5 GiB, 0.47 s per 4-sample step on an H200 "
                        "(~5.0x the fastest run of the blog's recipe measured on an H200, 2.37 s on 2026-12-03)", 80.0),
}
TINY = "tiny-cpu"


def pick(hw: Hardware) -> str:
    """The preset for this machine, by GPU memory."""
    if hw.profile == "tiny" or hw.gpu is None:
        return TINY
    gib = hw.gpu.total_gib
    return "8-12gb" if gib < 14 else "t4-16gb" if gib < 20 else "4090-24gb" if gib < 40 else "h100-80gb"


def budget_for(name: str, hw: Hardware | None = None) -> float:
    """The preset's budget, or less where this machine's GPU has less memory (a 48 GB card on the 80 GB preset)."""
    gib = PRESETS[name].budget_gib
    return min(gib, hw.gpu.total_gib) if hw is not None and hw.gpu is not None else gib


def compiles(name: str, hw: Hardware | None = None) -> bool:
    """Whether the preset's training runs compiled blocks: as this machine decides for train.compile="auto",
    which every preset sets (fluxnb.run.hardware.Hardware.compiles), or, with no machine to ask, as its GPUs do."""
    return hw.compiles("auto") if hw is not None and hw.gpu is not None else PRESETS[name].compiled


def plan(config: RunConfig, name: str, hw: Hardware | None = None) -> budget.Plan:
    """fluxnb.train.budget's layout for this preset's budget at the config's image size, text length and LoRA."""
    d = config.data
    return budget.choose(budget_for(name, hw), d.width, d.height, d.max_sequence_length, config.lora,
                         PRESETS[name].host_gib, compiles(name, hw), ema=config.train.ema_decay > 0,
                         control=config.model.kontext)  # Kontext: each sample's control tokens too


def apply(config: RunConfig, name: str, hw: Hardware | None = None) -> RunConfig:
    """A validated copy of `config` with the preset's settings (the tiny preset changes nothing)."""
    if name == TINY:
        return config
    settings = plan(config, name, hw).settings()
    train = {"compile": "auto"} | settings["train"]
    if config.train.optimizer == "prodigy":
        del train["optimizer"]
    return config.replace(model=_QLORA | settings["model"], train=train)


def describe(config: RunConfig, name: str) -> str:
    """The preset's sentence for the form, with the base it trains (and, for Krea, why the numbers still hold)."""
    base = config.model.base
    same = ("" if base == "FLUX.1-dev" else " (FLUX.1-dev's architecture; each sample's control image doubles its "
            "image tokens, planned for)" if config.model.kontext else " (FLUX.1-dev's architecture: the same memory and time)")
    return f"{PRESETS[name].description}. Base model: {base}{same}."


def unplanned(config: RunConfig) -> bool:
    """A real run whose training settings are still the blog recipe's defaults (EMA aside: no preset sets it): no
    preset was chosen yet (a new run directory; opening a run plans nothing, notebook 03's form and the CLI's
    `train` do). Never a LoKr run: presets plan the NF4 base, which LoKr cannot train (fluxnb.model.lora)."""
    default = RunConfig(profile="real").train
    return (config.profile == "real" and config.lora.type != "lokr"
            and replace(config.train, ema_decay=default.ema_decay) == default)


def plan_if_unplanned(config: RunConfig, hw: Hardware) -> str | None:
    """The machine's preset applied to an unplanned config (in place), and its name; None when already planned."""
    if not unplanned(config):
        return None
    apply_in_place(config, pick(hw), hw)
    return pick(hw)


def matching(config: RunConfig, hw: Hardware | None = None) -> str:
    """The preset whose every setting `config` has (this machine's own if several do), or "custom"."""
    if config.profile == "tiny":
        return TINY
    found = []
    for name in PRESETS:
        preset_config = apply(config, name, hw)
        if (preset_config.model, preset_config.train) == (config.model, config.train):
            found.append(name)
    if hw is not None and pick(hw) in found:  # t4-16gb and 4090-24gb differ only in the dtype the GPU picks
        return pick(hw)
    return found[0] if found else "custom"


def apply_in_place(config: RunConfig, name: str, hw: Hardware | None = None) -> None:
    """Like `apply`, but into the existing dataclasses, so forms and other holders of them see the change."""
    fresh = apply(config, name, hw)
    for section in ("model", "train"):
        target, source = getattr(config, section), getattr(fresh, section)
        for key, value in vars(source).items():
            setattr(target, key, value)
