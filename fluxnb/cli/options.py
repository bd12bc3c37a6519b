"""The CLI's options: one table per kind of subcommand, each option once with its help line."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config

DATA_ARGS = ("dataset", "image_column", "caption_column", "instance_prompt", "width", "height", "buckets",
              "bucket_step", "crop", "flip", "small_images", "bad_images", "max_sequence_length", "captioner",
              "masked_loss", "mask_column", "mask_floor", "control_column")

RUN_DIR = "run directory (default: $FLUXNB_RUN_DIR, else runs/mucha, or runs/tiny on the tiny profile)"
# Every option of embed, caption and latents, once, with its help line; each of them takes the ones it reads (USES).
# Not given, an option keeps the value in RUN/config.json (or fluxnb.config's default); given, it is saved there.
STEP_OPTIONS: dict[str, dict] = {
    "--run-dir": dict(type=Path, help=RUN_DIR),
    "--profile": dict(choices=config.PROFILES, help="force a profile (default: detect; 'tiny' = the offline stand-in)"),
    "--model": dict(help="FLUX checkpoint: Hub id or local diffusers folder (default: the --base's Hub repo)"),
    "--base": dict(choices=list(config.BASES), help="which FLUX.1 to train for: FLUX.1-dev (default), FLUX.1-Krea-dev "
                   "or FLUX.1-Kontext-dev (the same architecture; Kontext trains on image pairs, FOLDER/control/<image's "
                   "path>); --model, if given, is a copy of it"),
    "--revision": dict(help="model revision on the Hub: branch, tag or commit (default: main)"),
    "--dataset": dict(help="Hub dataset id or local folder of images (default: derekl35/alphonse-mucha-style)"),
    "--image-column": dict(help="dataset column holding the images (default: image)"),
    "--caption-column": dict(help="dataset column (or metadata.jsonl field) holding the captions (default: text)"),
    "--instance-prompt": dict(help="trigger words put before every caption, e.g. 'mucha style' (default: none)"),
    "--width": dict(type=int, help="training width in pixels, a multiple of 16 (default: 512)"),
    "--height": dict(type=int, help="training height in pixels, a multiple of 16 (default: 768)"),
    "--buckets": dict(action=argparse.BooleanOptionalAction, help="aspect-ratio buckets of ~width x height pixels "
                      "(default); --no-buckets: every image at width x height"),
    "--bucket-step": dict(type=int, help="bucket sides are multiples of this many pixels, of 16 (default: 64)"),
    "--crop": dict(choices=config.CROPS, help="cut images to their bucket in the middle, or at a spot fixed per image "
                   "(default: center)"),
    "--flip": dict(action=argparse.BooleanOptionalAction, help="also cache a mirrored copy of each image"),
    "--small-images": dict(choices=config.SMALL_IMAGE_POLICIES, help="images smaller than their bucket: upscale them "
                           "and warn, or skip them (default: warn)"),
    "--bad-images": dict(choices=config.BAD_IMAGE_POLICIES, help="unreadable image files: skip them (listed in the "
                         "report), or stop (default: skip)"),
    "--max-sequence-length": dict(type=int, help="T5 tokens per caption, 1-512 (default: 77)"),
    "--masked-loss": dict(action=argparse.BooleanOptionalAction, help="weigh the loss by a grey mask per image "
                          "(white = learn, black = ignore): FOLDER/masks/<image's path>, or a Hub column"),
    "--mask-column": dict(help="Hub dataset column holding the masks (default: mask)"),
    "--mask-floor": dict(type=float, help="the least loss weight, where a mask is black, in [0, 1) (default: 0)"),
    "--control-column": dict(help="FLUX.1-Kontext-dev, Hub datasets: the column holding each pair's input image "
                             "(default: control_image; local folders: FOLDER/control/<image's path>)"),
    "--overwrite": dict(action="store_true", help="rebuild a cache made with other settings"),
}
USES = {
    "embed": list(STEP_OPTIONS),
    "caption": ["--run-dir", "--profile", "--model", "--base", "--revision", "--dataset", "--caption-column",
                "--instance-prompt", "--max-sequence-length"],
    "latents": ["--run-dir", "--profile", "--width", "--height", "--buckets", "--bucket-step", "--crop", "--flip",
                "--small-images", "--bad-images", "--masked-loss", "--mask-column", "--mask-floor", "--control-column",
                "--overwrite"],
}


# train's options that change what a preset plans (lora.type, train.ema_decay): applied before it plans.
ADAPTER_OPTIONS: dict[str, dict] = {
    "--lora-type": dict(choices=config.LORA_TYPES, help="the adapter: lora (default), dora (LoRA + a learned magnitude "
                        "per output row) or lokr (Kronecker factors; not on the NF4 base); saved as lora.type"),
    "--ema-decay": dict(type=float, help="keep an EMA of the LoRA weights, e.g. 0.999: samples and saved LoRAs use it "
                        "(0 = off, the default); saved as train.ema_decay"),
}
# train's options beyond the preset's (saved in RUN/config.json once training starts; not given: kept as there).
TRAIN_OPTIONS: dict[str, dict] = {
    "--optimizer": dict(choices=config.OPTIMIZERS, help="adamw8bit or adamw (the preset picks), or prodigy"),
    "--learning-rate": dict(type=float, help="Adam's step size (default 1e-4), or Prodigy's multiplier (give 1.0)"),
    "--caption-dropout": dict(type=float, help="chance a sample trains on the empty prompt (default 0)"),
    "--weighting-scheme": dict(choices=config.WEIGHTING_SCHEMES, help="how timesteps are drawn (default: none)"),
    "--sigmoid-scale": dict(type=float, help="flux_shift's spread: sigmoid(scale * N(0, 1)) (default 1.0)"),
}
TRAIN_ARGS = [o.removeprefix("--").replace("-", "_") for o in TRAIN_OPTIONS]
