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

from .base.errors import FluxnbError
from .base.files import atomic_write_text

CONFIG_FILE = "config.json"

PROFILES = ("real", "tiny")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap")
# LoRA target presets -> peft's target_modules (fluxnb.model.lora); the notebook's dropdown lists these names.
LORA_TARGETS: dict[str, list[str] | str] = {
    "attention": ["to_k", "to_q", "to_v", "to_out.0"],  # the blog's: image-stream attention of every block
    "all-linear": "all-linear",  # every Linear layer (peft's shorthand)
    # every projection of the 38 single-stream blocks; peft reads a string as a regex of the whole module name
    "single-blocks": r"single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)",
}
LORA_INITS = ("gaussian", "default")
LORA_TYPES = ("lora", "dora", "lokr")  # fluxnb.model.lora.peft_config: peft's LoRA, DoRA, LoKr
# peft's inits that start the adapter from the weight's own decomposition and subtract that start from the frozen
# base: the LoRA a run saves then belongs to that changed base, and every tool applies it to the original one.
BASE_CHANGING_INITS = ("pissa", "olora")
QUANTIZATIONS = ("nf4", "none", "fp8")
COMPILE_MODES = ("auto", "on", "off")
DTYPES = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw8bit", "adamw")
CROPS = ("center", "random")
SMALL_IMAGE_POLICIES = ("warn", "skip")
BAD_IMAGE_POLICIES = ("skip", "error")
EXPORT_FORMATS = ("comfyui", "diffusers")  # notebook 04's LoRA files: kohya/BFL layout, or a diffusers copy
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(FluxnbError, ValueError):
    """A bad configuration value: the message says which field, what was given, and what is allowed."""


def local_path(value: str | None) -> str | None:
    """`value` as an absolute path if it names an existing file or folder here, else unchanged (a Hub id)."""
    if not value or not Path(value).expanduser().exists():
        return value
    return os.path.abspath(os.path.expanduser(value))  # not resolve(): a symlinked folder stays as named


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} is not supported; choose one of {', '.join(choices)}.")


def _check_positive(name: str, value: float) -> None:
    _check(value > 0, f"{name} must be > 0, got {value!r}.")


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
    captioner: str = "Salesforce/blip-image-captioning-large"  # writes missing captions (fluxnb.data.captions)
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "Serene raven-haired woman, moonlit lilies, swirling botanicals, alphonse mucha style",
            "a puppy in a pond, alphonse mucha style",
        ]
    )

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "dataset is empty: give a hub id (user/name) or a local folder.")
        for name in ("width", "height"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and value > 0 and value % 16 == 0,
                f"{name}={value!r} must be a positive multiple of 16 (the VAE downsamples by 8 and FLUX packs 2x2 "
                f"latent patches); try {max(16, round(value / 16) * 16) if isinstance(value, (int, float)) else 512}.",
            )
        _check_choice("crop", self.crop, CROPS)
        _check_choice("small_images", self.small_images, SMALL_IMAGE_POLICIES)
        _check_choice("bad_images", self.bad_images, BAD_IMAGE_POLICIES)
        _check(
            isinstance(self.bucket_step, int) and self.bucket_step > 0 and self.bucket_step % 16 == 0,
            f"bucket_step={self.bucket_step!r} must be a positive multiple of 16 (e.g. 64).",
        )
        _check(
            isinstance(self.max_sequence_length, int) and 1 <= self.max_sequence_length <= 512,
            f"max_sequence_length={self.max_sequence_length!r} must be between 1 and 512 (FLUX.1-dev's T5 limit).",
        )
        _check(
            all(isinstance(p, str) and p.strip() for p in self.validation_prompts),
            "validation_prompts must be non-empty strings.",
        )


@dataclass
class ModelConfig:
    """Which FLUX checkpoint and how the frozen transformer is held in memory."""

    model_id: str = "black-forest-labs/FLUX.1-dev"  # hub id or local folder in diffusers layout
    revision: str | None = None
    quantization: str = "nf4"  # "nf4" = QLoRA; "none" = plain bf16/fp16 LoRA; "fp8" = bf16 weights, float8 matmuls
    double_quant: bool = False  # NF4 with quantized quantization constants (~0.4 bits/param less)
    prequantized: str | None = None  # folder or hub repo of an NF4 transformer saved by fluxnb.model.quant
    dtype: str = "auto"  # compute dtype; "auto" = bf16 where the GPU has it, fp16 on T4/20-series, fp32 on CPU
    offload_blocks: int = 0  # transformer blocks (of 57) whose frozen weights wait in CPU RAM (fluxnb.model.offload)

    def __post_init__(self) -> None:
        _check(bool(self.model_id), "model_id is empty: give a hub id or a local diffusers folder.")
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check(isinstance(self.offload_blocks, int) and self.offload_blocks >= 0,
               f"offload_blocks must be an integer >= 0 (0 = none, 57 = all of FLUX's blocks), "
               f"got {self.offload_blocks!r}.")
        _check_choice("dtype", self.dtype, DTYPES)


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
        _check(isinstance(self.rank, int) and self.rank > 0, f"rank must be a positive integer, got {self.rank!r}.")
        _check_positive("alpha", self.alpha)
        _check(self.init not in BASE_CHANGING_INITS,
               f"init={self.init!r} changes the base model's weights while training, so ComfyUI, Forge, kohya, "
               f"diffusers and fluxnb's merge would apply the saved LoRA to the wrong base: use 'gaussian' (the "
               f"default) or 'default'.")
        _check_choice("init", self.init, LORA_INITS)
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")
        _check_choice("type", self.type, LORA_TYPES)
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
    optimizer: str = "adamw8bit"
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
        _check_positive("learning_rate", self.learning_rate)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "keep_checkpoints", "sample_steps"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        _check(self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale!r}.")
        _check_choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        _check_positive("logit_std", self.logit_std)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("compile", self.compile, COMPILE_MODES)
        keep, gib = self.keep_activations, self.memory_budget_gib
        _check(isinstance(keep, int) and keep >= 0,
               f"keep_activations must be an integer >= 0 (0 = every block checkpointed), got {keep!r}.")
        _check(isinstance(gib, (int, float)) and gib >= 0, f"memory_budget_gib must be a number >= 0, got {gib!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value!r}.")
        _check(self.adam_weight_decay >= 0, f"adam_weight_decay must be >= 0, got {self.adam_weight_decay!r}.")
        _check_positive("adam_epsilon", self.adam_epsilon)
        _check_positive("max_grad_norm", self.max_grad_norm)
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (0 = off, 0.999 typical), got {self.ema_decay!r}.")
        for name in ("sample_every", "checkpoint_every", "validation_samples", "validate_every"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}.")


@dataclass
class RunConfig:
    """Everything one run directory was made with. Saved next to every artifact as config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: str = "real"  # "real" or "tiny" (see fluxnb.run.hardware.detect)

    def __post_init__(self) -> None:
        _check_choice("profile", self.profile, PROFILES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        parts = {"data": DataConfig, "model": ModelConfig, "lora": LoRAConfig, "train": TrainConfig}
        unknown = set(raw) - set(parts) - {"profile"}
        _check(not unknown, f"config has unknown sections {sorted(unknown)}; expected {sorted(parts)} and profile.")
        kwargs: dict[str, Any] = {}
        for name, part in parts.items():
            values = dict(raw.get(name, {}))
            known = {f.name for f in dataclasses.fields(part)}
            extra = set(values) - known
            _check(not extra, f"config section '{name}' has unknown keys {sorted(extra)}; known: {sorted(known)}.")
            kwargs[name] = part(**values)
        return cls(**kwargs, profile=raw.get("profile", "real"))

    def with_local_paths_resolved(self) -> RunConfig:
        """A copy whose dataset, model and prequantized folders, when they name a local path, are absolute.

        A relative path means "from here": stored as typed, a later step run from another working directory
        (the notebooks run in notebooks/) would look for it in the wrong place, then on the Hub. Hub ids (no
        such local path) stay as typed."""
        m = self.model
        return self.replace(data={"dataset": local_path(self.data.dataset)},
                            model={"model_id": local_path(m.model_id), "prequantized": local_path(m.prequantized)})

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields changed, validated: `cfg.replace(train={"max_train_steps": 50})`."""
        raw = self.to_dict()
        for name, values in sections.items():
            if name == "profile":
                raw["profile"] = values
            else:
                raw[name].update(values)
        return RunConfig.from_dict(raw)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CONFIG_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise FluxnbError(
                f"{path} does not exist: run notebook 01 (or `python -m fluxnb embed --run-dir {run_dir}`) first, "
                "which creates the run directory and its config."
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); fix it or delete it to start over.") from None
        return cls.from_dict(raw)
