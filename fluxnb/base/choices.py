"""The values a setting may take: fluxnb.config checks its fields against these tables, and the CLI's options, the
notebook forms and the export list read them from there (`from fluxnb.config import CROPS` keeps working).
"""

from __future__ import annotations

PROFILES = ("real", "tiny")
# FLUX.1 checkpoints of one architecture: model.base names one, model.model_id defaults to its Hub repo.
# FLUX.1-Kontext-dev edits a control image (ModelConfig.kontext): its data are (control, instruction) -> target pairs.
BASES = {"FLUX.1-dev": "black-forest-labs/FLUX.1-dev", "FLUX.1-Krea-dev": "black-forest-labs/FLUX.1-Krea-dev",
         "FLUX.1-Kontext-dev": "black-forest-labs/FLUX.1-Kontext-dev"}
KONTEXT = "FLUX.1-Kontext-dev"
# diffusers' densities (fluxnb.train.flow), and sd-scripts' resolution-shifted "flux_shift"
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "flux_shift")
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
OPTIMIZERS = ("adamw8bit", "adamw", "prodigy")
CROPS = ("center", "random")
SMALL_IMAGE_POLICIES = ("warn", "skip")
BAD_IMAGE_POLICIES = ("skip", "error")
EXPORT_FORMATS = ("comfyui", "diffusers")  # notebook 04's LoRA files: kohya/BFL layout, or a diffusers copy
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
