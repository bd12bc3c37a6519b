"""Typed configuration for a fluxnb run. Defaults are the blog recipe (FLUX.1-dev QLoRA on an RTX 4090).

One `RunConfig` holds four parts (data, model, LoRA, training). It is validated when built, saved as
`config.json` in the run directory, and passed explicitly to every step: no global `args`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The values a setting may take (BASES, CROPS, ...) live in fluxnb.base.choices; the rest of fluxnb imports them here.
from .base.choices import (  # noqa: F401
    BAD_IMAGE_POLICIES, BASE_CHANGING_INITS, BASES, COMPILE_MODES, CROPS, DTYPES, EXPORT_FORMATS, KONTEXT,
    LORA_INITS, LORA_TARGETS, LORA_TYPES, LR_SCHEDULERS, OPTIMIZERS, PROFILES, QUANTIZATIONS, SMALL_IMAGE_POLICIES,
    WEIGHTING_SCHEMES,
)
from .base.errors import FluxnbError
from .base.fields import ConfigError, check_fields
from .base.fields import check as _check
from .base.files import atomic_write_text

CONFIG_FILE = "config.json"


def local_path(value: str | None) -> str | None:
    """`value` as an absolute path if it names an existing file or folder here, else unchanged (a Hub id)."""
    if not value or not Path(value).expanduser().exists():
        return value
    return os.path.abspath(os.path.expanduser(value))  # not resolve(): a symlinked folder stays as named


# Ranges and choices by field name (no two sections share one); each section's own checks follow them.
_POSITIVE = ("rank", "alpha", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_train_steps",
             "keep_checkpoints", "sample_steps", "logit_std", "sigmoid_scale", "adam_epsilon", "max_grad_norm")
_NOT_NEGATIVE = ("offload_blocks", "lr_warmup_steps", "guidance_scale", "keep_activations", "memory_budget_gib",
                 "adam_weight_decay", "sample_every", "checkpoint_every", "validation_samples", "validate_every")
_RANGES = {**dict.fromkeys(_POSITIVE, (lambda v: v > 0, "> 0")),
           **dict.fromkeys(_NOT_NEGATIVE, (lambda v: v >= 0, ">= 0")),
           **dict.fromkeys(("dropout", "caption_dropout", "mask_floor", "ema_decay", "adam_beta1", "adam_beta2"),
                           (lambda v: 0 <= v < 1, "in [0, 1)"))}
_CHOICES = {"crop": CROPS, "small_images": SMALL_IMAGE_POLICIES, "bad_images": BAD_IMAGE_POLICIES,
            "quantization": QUANTIZATIONS, "dtype": DTYPES, "lr_scheduler": LR_SCHEDULERS, "compile": COMPILE_MODES,
            "weighting_scheme": WEIGHTING_SCHEMES, "optimizer": OPTIMIZERS, "profile": PROFILES, "init": LORA_INITS,
            "type": LORA_TYPES,
            "base": tuple(BASES)}


def _check_fields(obj: Any, section: str) -> None:
    check_fields(obj, section, _RANGES, _CHOICES)


@dataclass
class DataConfig:
    """What to train on and at which size. Captions are encoded once (notebook 01), images once (notebook 02)."""

    dataset: str = "derekl35/alphonse-mucha-style"  # hub id or local folder
    image_column: str = "image"
    caption_column: str = "text"
    instance_prompt: str = ""  # trigger word prepended to every caption ("" = none)
    width: int = 512
    height: int = 768
    buckets: bool = True  # aspect-ratio buckets around width*height; False = everything at width x height
    crop: str = "center"
    flip: bool = False  # also cache a horizontally flipped copy of each image as its own sample
    small_images: str = "warn"  # images smaller than their bucket: "warn" (upscale) or "skip"
    bad_images: str = "skip"  # unreadable/corrupt image files: "skip" (listed in the report) or "error" (stop)
    bucket_step: int = 64  # bucket sides are multiples of this many pixels (a multiple of 16)
    max_sequence_length: int = 77  # T5 tokens; FLUX.1-dev allows up to 512
    captioner: str = "florence-community/Florence-2-large"  # writes missing captions (fluxnb.data.captioner)
    masked_loss: bool = False  # weight the loss by a grey mask per image (white = learn, black = ignore): data.masks
    mask_column: str = "mask"  # Hub datasets: the image column holding the masks (local folders: masks/ beside them)
    mask_floor: float = 0.0  # the least weight a pixel gets: 0.0 = black ignores it, 0.1 = still learns a little
    control_column: str = "control_image"  # Kontext, Hub datasets: each pair's input image (local: control/ beside)
    validation_images: list[str] = field(default_factory=list)  # Kontext: a control image file per validation prompt
    # ([] = the controls of the first training pairs, cycled: fluxnb.data.controls.validation_controls)
    validation_prompts: list[str] = field(default_factory=lambda: [
        "Serene raven-haired woman, moonlit lilies, swirling botanicals, alphonse mucha style",
        "a puppy in a pond, alphonse mucha style"])

    def __post_init__(self) -> None:
        _check_fields(self, "data.")
        _check(bool(self.dataset), "dataset is empty: give a hub id (user/name) or a local folder.")
        for name in ("width", "height", "bucket_step"):
            value = getattr(self, name)
            _check(value > 0 and value % 16 == 0,
                   f"{name}={value!r} must be a positive multiple of 16 (the VAE downsamples by 8 and FLUX packs 2x2 "
                   f"latent patches); try {max(16, round(value / 16) * 16)}.")
        _check(1 <= self.max_sequence_length <= 512,
               f"max_sequence_length={self.max_sequence_length!r} must be between 1 and 512 (FLUX.1-dev's T5 limit).")
        _check(bool(self.validation_prompts) and all(p.strip() for p in self.validation_prompts),
               f"data.validation_prompts={json.dumps(self.validation_prompts)} must hold at least one prompt, none "
               "empty: the sample grids, notebook 04's images and the model card's example start from them.")
        # Not checked for existence here: a run opened on a new machine, its images not copied yet, still opens;
        # fluxnb.data.controls.validation_controls names a missing one when the samples are made.
        n, prompts = len(self.validation_images), len(self.validation_prompts)
        _check(n in (0, prompts), f"data.validation_images has {n} image(s) for {prompts} validation prompt(s): give "
                                  "one control image per prompt, or [] for the first training pairs' controls.")


@dataclass
class ModelConfig:
    """Which FLUX checkpoint and how the frozen transformer is held in memory."""

    model_id: str | None = None  # hub id or local folder in diffusers layout; None = the base's Hub repo
    base: str = "FLUX.1-dev"  # which FLUX.1 (BASES) the LoRA is for; "FLUX.1-Kontext-dev" trains on image pairs
    revision: str | None = None
    quantization: str = "nf4"  # "nf4" = QLoRA; "none" = plain bf16/fp16 LoRA; "fp8" = e4m3 weights, FP8 matmuls
    double_quant: bool = False  # NF4 with quantized quantization constants (~0.4 bits/param less)
    prequantized: str | None = None  # folder or hub repo of an NF4 / FP8 transformer saved by fluxnb.model.quant
    dtype: str = "auto"  # compute dtype; "auto" = bf16 where the GPU has it, fp16 on T4/20-series, fp32 on CPU
    offload_blocks: int = 0  # transformer blocks (of 57) whose frozen weights wait in CPU RAM (fluxnb.model.offload)

    def __post_init__(self) -> None:
        _check_fields(self, "model.")
        self.model_id = BASES[self.base] if self.model_id is None else self.model_id
        _check(bool(self.model_id), "model_id is empty: give a hub id or a local diffusers folder.")
        other = next((b for b, repo in BASES.items() if repo == self.model_id and b != self.base), None)
        _check(other is None, f"model_id={self.model_id!r} is {other}, but base={self.base!r}: set base={other!r}, "
                              f"or model_id to null (the base's own Hub repo).")

    @property
    def kontext(self) -> bool:
        """FLUX.1-Kontext-dev edits an input image: it trains on (control image, instruction) -> target pairs."""
        return self.base == KONTEXT


@dataclass
class LoRAConfig:
    """The adapter: rank-r matrices A (r x k) and B (d x r) next to frozen weights, scaled by alpha / r."""

    rank: int = 4
    alpha: float = 4.0
    init: str = "gaussian"
    dropout: float = 0.0
    targets: str = "attention"  # a preset name, or comma-separated module names (e.g. "to_q,to_v")
    type: str = "lora"  # "dora": + a learned magnitude per output row; "lokr": Kronecker factors (not on NF4)

    def __post_init__(self) -> None:
        _check(self.init not in BASE_CHANGING_INITS,  # before the choices: this one has its own reason
               f"init={self.init!r} changes the base model's weights while training, so ComfyUI, Forge, kohya, "
               f"diffusers and fluxnb's merge would apply the saved LoRA to the wrong base: use 'gaussian' (the "
               f"default) or 'default'.")
        _check_fields(self, "lora.")
        _check(self.type != "lokr" or self.dropout == 0, "dropout drops LoRA's input; LoKr has none: set dropout=0.")
        _check(bool(self.targets.strip()), f"targets is empty; use a preset ({', '.join(LORA_TARGETS)}) or names.")

    @property
    def target_modules(self) -> list[str] | str:
        """peft's target_modules: a preset's (see LORA_TARGETS), otherwise the comma-separated module names."""
        if self.targets in LORA_TARGETS:
            return LORA_TARGETS[self.targets]
        return [name.strip() for name in self.targets.split(",") if name.strip()]


@dataclass
class TrainConfig:
    """The optimisation. Defaults are the blog's command line (700 steps x 4 accumulation, lr 1e-4, 8-bit AdamW)."""

    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    max_train_steps: int = 700  # optimizer steps
    guidance_scale: float = 1.0  # value fed to FLUX.1-dev's guidance embedding while training
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0  # "flux_shift": sigma = shift(sigmoid(sigmoid_scale * N(0, 1))), as sd-scripts
    caption_dropout: float = 0.0  # chance a sample trains on the empty prompt's embedding instead of its caption's
    optimizer: str = "adamw8bit"  # "prodigy" finds its own step size: learning_rate then scales it (1.0 typical)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    keep_activations: int = 0  # the last blocks (of 57) that keep their activations rather than being checkpointed
    memory_budget_gib: float = 0.0  # the GPU memory the layout was planned for (fluxnb.train.budget; 0 = none)
    compile: str = "auto"  # torch.compile the blocks: "auto" = on CUDA GPUs with Triton, capability >= 8.0
    seed: int = 0
    sample_every: int = 100  # optimizer steps between validation sample grids (0 = never)
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    sample_steps: int = 20  # denoising steps for the validation grids
    validation_samples: int = 2  # images held out of training for the validation loss (0 = a fixed training subset)
    validate_every: int = 25  # optimizer steps between validation losses (0 = never)
    ema_decay: float = 0.0  # EMA of the LoRA weights (0 = off, 0.999 typical); samples and saved LoRAs use it

    def __post_init__(self) -> None:
        _check_fields(self, "train.")


def _follow_base(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """model.base and a base's Hub repo in model_id move together: a new base alone takes its repo along (unless
    model_id names something else, e.g. a local copy), a base's repo given alone as model_id sets the base."""
    new = dict(new)
    if "base" in new and "model_id" not in new and old["model_id"] in BASES.values():
        new["model_id"] = None
    if "base" not in new and new.get("model_id") in BASES.values():
        new["base"] = next(b for b, repo in BASES.items() if repo == new["model_id"])
    return new


@dataclass
class RunConfig:
    """Everything one run directory was made with. Saved next to every artifact as config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: str = "real"  # "real" or "tiny" (see fluxnb.run.hardware.detect)

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(self.model.kontext or not self.data.validation_images,
               f"data.validation_images are control images for {KONTEXT}'s edits, but model.base="
               f"{self.model.base!r}: set validation_images to [] (or model.base to {KONTEXT!r}).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Checked in the order a hand edit goes wrong: the shape (sections, keys), then every value's type, then
        its range. A key missing inside a section takes its default (a config.json older than the field); a
        missing section is an error, since a run's defaults (the tiny profile's, a preset's) are not the class's."""
        parts = {"data": DataConfig, "model": ModelConfig, "lora": LoRAConfig, "train": TrainConfig}
        fix = "restore it (each checkpoints/step-N/config.json holds a copy) or delete config.json to start over"
        _check(isinstance(raw, dict), f"the config is {json.dumps(raw)[:40]}, not an object of sections: {fix}.")
        unknown = set(raw) - set(parts) - {"profile"}
        _check(not unknown, f"config has unknown sections {sorted(unknown)}; expected {sorted(parts)} and profile.")
        for name, part in parts.items():
            _check(name in raw, f"the {name} section is missing: {fix}.")
            _check(isinstance(raw[name], dict), f"{name}={json.dumps(raw[name])[:40]} must be an object of settings "
                                                f"{{\"key\": value, ...}}: {fix}.")
            known = {f.name for f in dataclasses.fields(part)}
            extra = set(raw[name]) - known
            _check(not extra, f"config section '{name}' has unknown keys {sorted(extra)}; known: {sorted(known)}.")
        _check("profile" in raw, f"profile is missing (\"real\" or \"tiny\"): {fix}.")
        sections = {name: _follow_base({"model_id": None}, raw[name]) if name == "model" else raw[name]  # no base yet
                    for name in parts}
        return cls(**{name: part(**sections[name]) for name, part in parts.items()}, profile=raw["profile"])

    def with_local_paths_resolved(self) -> RunConfig:
        """A copy whose dataset, validation images, model and prequantized folders, when local paths, are absolute.

        A relative path means "from here": stored as typed, a later step run from another working directory
        (the notebooks run in notebooks/) would look for it in the wrong place, then on the Hub. Hub ids (no
        such local path) stay as typed."""
        m = self.model
        images = [local_path(p) for p in self.data.validation_images]
        return self.replace(data={"dataset": local_path(self.data.dataset), "validation_images": images},
                            model={"model_id": local_path(m.model_id), "prequantized": local_path(m.prequantized)})

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields changed, validated: `cfg.replace(train={"max_train_steps": 50})`."""
        raw = self.to_dict()
        for name, values in sections.items():
            if name == "profile":
                raw["profile"] = values
            else:
                raw[name] = raw[name] | (_follow_base(raw[name], values) if name == "model" else values)
        return RunConfig.from_dict(raw)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CONFIG_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise FluxnbError(f"{path} does not exist: run notebook 01 (or `python -m fluxnb embed --run-dir "
                              f"{run_dir}`) first, which creates the run directory and its config.")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); fix it or delete it to start over.") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
