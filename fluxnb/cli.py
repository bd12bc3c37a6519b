"""`python -m fluxnb`: the headless mirror of the notebooks, one subcommand per step.

    python -m fluxnb tiny --out DIR          build the offline tiny FLUX model + dataset
    python -m fluxnb notebooks               run notebooks 01-05 top to bottom (the whole series)
    python -m fluxnb caption --run-dir RUN --dataset FOLDER [--all]   notebook 01: caption images (metadata.jsonl)
    python -m fluxnb embed --run-dir RUN --model MODEL --dataset DATASET   notebook 01: check data, cache text embeddings
    python -m fluxnb latents --run-dir RUN   notebook 02: cache VAE latents (model and dataset from RUN/config.json)
    python -m fluxnb train --run-dir RUN [--max-steps N] [--resume | --overwrite]   notebook 03: QLoRA training
    python -m fluxnb export --run-dir RUN --format comfyui|diffusers   notebook 04: LoRA file for ComfyUI/Forge/kohya
    python -m fluxnb push --run-dir RUN --repo-id ID [--dry-run]       notebook 05: model card + upload (private)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

from .base.errors import FluxnbError
from .base.interrupts import check_interrupted, watching_interrupts
from .config import (
    BAD_IMAGE_POLICIES,
    CROPS,
    EXPORT_FORMATS,
    PROFILES,
    SMALL_IMAGE_POLICIES,
)


def cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny.flux import build_tiny

    assets = build_tiny(args.out)
    print(f"model:   {assets.model}\ndataset: {assets.dataset}")
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    from .nb.runner import run_notebooks

    return run_notebooks(args.run_dir, only=args.only, timeout=args.timeout)


_DATA_ARGS = ("dataset", "image_column", "caption_column", "instance_prompt", "width", "height", "buckets",
              "bucket_step", "crop", "flip", "small_images", "bad_images", "max_sequence_length")


def _open_step_run(args: argparse.Namespace):
    """open_run(--run-dir), with the options given on the command line applied (saved once the step succeeds).

    Local paths are made absolute now: the caches' settings name the model, and later steps may run elsewhere."""
    from .run import open_run

    run = open_run(args.run_dir, profile=args.profile, create=False)
    data = {k: getattr(args, k) for k in _DATA_ARGS if getattr(args, k, None) is not None}
    model = {k: v for k, v in (("model_id", args.model), ("revision", args.revision)) if v is not None}
    run.config = run.config.replace(data=data, model=model).with_local_paths_resolved()
    return run


@contextlib.contextmanager
def _first_step(root: Path):
    """A first `embed` that fails leaves no run directory behind (nor a config.json of defaults that the next
    step would take for the user's choice); one that has written caches keeps them."""
    existed = root.exists()
    try:
        yield
    except BaseException:
        if not existed and root.is_dir() and {p.name for p in root.iterdir()} <= {".lock"}:
            shutil.rmtree(root, ignore_errors=True)
        raise


def cmd_embed(args: argparse.Namespace) -> int:
    from .data.embeddings import embed_step

    run = _open_step_run(args)
    with _first_step(run.dir.root), run.writing("embed"):
        print(embed_step(run, overwrite=args.overwrite))
        run.save()  # config.json describes the caches it sits next to
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .data.captions import caption_step

    run = _open_step_run(args)
    if args.captioner:
        run.config = run.config.replace(data={"captioner": args.captioner})
    with _first_step(run.dir.root), run.writing("caption"):
        print(caption_step(run, overwrite=args.all or args.overwrite, trigger=args.trigger))
        run.save()  # the folder captioned is the dataset the next steps read
    return 0


def cmd_latents(args: argparse.Namespace) -> int:
    from .data.latents import latents_step

    run = _open_step_run(args)
    if not run.dir.config.is_file():
        raise FluxnbError(f"{run.dir.root} has no config.json: run notebook 01 first (`python -m fluxnb embed "
                          f"--run-dir {run.dir.root} --dataset ...`), which checks the data and creates it.")
    with run.writing("latents"):
        print(latents_step(run, overwrite=args.overwrite))
        run.save()
    return 0


# What a folder without config.json still needs before each command can run there (the steps make config.json).
_MISSING_STEPS = {
    "train": "notebooks 01 and 02 have not run there: cache the text embeddings and latents first "
             "(`python -m fluxnb embed --run-dir {root} --model MODEL --dataset DATASET`, then "
             "`python -m fluxnb latents --run-dir {root}`), or pass the --run-dir they were made in",
    "trained": "no run was trained there: run notebooks 01-03 first (embed, latents, train), or pass the --run-dir "
               "of a trained run",
}


def _existing_run(run_dir: Path | None, needs: str = "trained"):
    """open_run on a run directory that earlier steps made (never creates a fresh one); `needs` names what is missing."""
    from .run import default_run_dir, open_run
    from .run.hardware import detect

    root = run_dir or default_run_dir(detect().profile)
    if not (root / "config.json").is_file():
        raise FluxnbError(f"{root} is not a run directory yet (no config.json): "
                          + _MISSING_STEPS[needs].format(root=root) + ".")
    return open_run(root)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import presets, train

    run = _existing_run(args.run_dir, "train")
    planned = presets.plan_if_unplanned(run.config, run.hw)  # a run no form planned: this machine's preset
    if planned:
        print(f"fluxnb: training settings from the {planned!r} preset (fluxnb.train.presets), saved to config.json")
        run.save()
    again = f"python -m fluxnb train --run-dir {run.dir.root} --resume"
    result = train(run, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps, live=False,
                   how_to_resume=again)
    return 130 if result.interrupted else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .infer.export import check_round_trip, export_lora, export_path

    run = _existing_run(args.run_dir)
    lora, out = args.lora or run.dir.lora_file, args.out or export_path(run.dir, args.format)
    inside = out.resolve().is_relative_to(run.dir.root.resolve())  # elsewhere, the run is only read: no lock
    with run.writing("export") if inside else contextlib.nullcontext():
        out = export_lora(lora, args.format, out)
    print(f"{args.format}: {out}")
    if args.format == "comfyui":
        print(check_round_trip(lora, out))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .share.hub import HubSettings, push, stage

    run = _existing_run(args.run_dir)
    settings = HubSettings(repo_id=args.repo_id, private=not args.public, dry_run=args.dry_run,
                           trigger_word=args.trigger_word or "")
    with run.writing("push"):
        staged = stage(run, settings)
        print(f"{staged}\n\n--- README.md (the model card) ---\n{staged.card}")
        result = push(run, staged, settings)
    print(result)
    return 0 if result.uploaded or args.dry_run else 1


def _step_options(p: argparse.ArgumentParser) -> None:
    """Options shared by embed and latents; each one given is saved in the run's config.json."""
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<profile name>)")
    p.add_argument("--profile", choices=PROFILES, default=None, help="force a profile (default: detect)")
    p.add_argument("--model", default=None, help="FLUX checkpoint: Hub id or local diffusers folder")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument("--dataset", default=None, help="Hub dataset id or local folder")
    p.add_argument("--image-column", dest="image_column", default=None)
    p.add_argument("--caption-column", dest="caption_column", default=None)
    p.add_argument("--instance-prompt", dest="instance_prompt", default=None, help="trigger words put before captions")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=None, help="aspect-ratio buckets")
    p.add_argument("--bucket-step", dest="bucket_step", type=int, default=None)
    p.add_argument("--crop", choices=CROPS, default=None)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="also cache mirrored copies")
    p.add_argument("--small-images", dest="small_images", choices=SMALL_IMAGE_POLICIES, default=None)
    p.add_argument("--bad-images", dest="bad_images", choices=BAD_IMAGE_POLICIES, default=None)
    p.add_argument("--max-sequence-length", dest="max_sequence_length", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fluxnb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="build the offline tiny FLUX pipeline and dataset")
    p.add_argument("--out", type=Path, required=True, help="folder to write model/ and dataset/ into")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("notebooks", help="execute notebooks 01-05 in order (tiny profile without a GPU)")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<profile name>)")
    p.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run, e.g. 01 02")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("embed", help="notebook 01: check the dataset, cache CLIP + T5 caption embeddings")
    _step_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("caption", help="notebook 01: caption the images of a local folder that have no caption")
    _step_options(p)
    p.add_argument("--all", action="store_true", help="caption every image, replacing the captions already there")
    p.add_argument("--trigger", default=None, help="words put before each new caption (default: --instance-prompt)")
    p.add_argument("--captioner", default=None, help="captioning model (default: Salesforce/blip-image-captioning-large)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("latents", help="notebook 02: cache VAE latents of every training image")
    _step_options(p)
    p.set_defaults(func=cmd_latents)

    p = sub.add_parser("train", help="notebook 03: train the LoRA on the cached latents and embeddings")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<profile name>)")
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None,
                   help="total optimizer steps (saved as train.max_train_steps in RUN/config.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest RUN/checkpoints/step-N")
    mode.add_argument("--overwrite", action="store_true", help="start over: delete checkpoints, samples and LoRA")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="notebook 04: write the LoRA for ComfyUI/Forge/kohya, or a diffusers copy")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<profile name>)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="comfyui")
    p.add_argument("--lora", type=Path, default=None, help="LoRA file (default: RUN/lora/pytorch_lora_weights.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: RUN/export/<run>_comfyui.safetensors)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="notebook 05: model card + upload to the Hub (private; --dry-run lists the files)")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<profile name>)")
    p.add_argument("--repo-id", required=True, help="'name' (your account) or 'user-or-org/name'")
    p.add_argument("--dry-run", action="store_true", help="only list the files and print the card")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--trigger-word", default=None, help="trigger word for the card (default: from the captions)")
    p.set_defaults(func=cmd_push)
    return parser


@watching_interrupts  # from the first line: a Ctrl-C swallowed by a __del__ at start-up still stops the command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        if code == 0:
            check_interrupted()  # one swallowed after the step's last check: not a success
        return code
    except FluxnbError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
