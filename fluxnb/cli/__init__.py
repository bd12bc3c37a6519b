"""`python -m fluxnb`: the headless mirror of the notebooks, one subcommand per step.

`python -m fluxnb --help` lists the subcommands, `python -m fluxnb SUBCOMMAND --help` their options; README,
"Command line", shows them in the order they run. Only what a subcommand runs is imported, when it runs: help and
argument errors answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import shutil
import sys
from pathlib import Path

from .. import config
from ..base.errors import FluxnbError
from ..base.interrupts import watching_interrupts
from .options import ADAPTER_OPTIONS, DATA_ARGS, RUN_DIR, STEP_OPTIONS, TRAIN_ARGS, TRAIN_OPTIONS, USES


def cmd_tiny(args: argparse.Namespace) -> int:
    from ..tiny.flux import build_tiny

    print("model:   {0.model}\ndataset: {0.dataset}".format(build_tiny(args.out)))
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    from ..nb.runner import run_notebooks

    return run_notebooks(args.run_dir, only=args.only, timeout=args.timeout)


def _open_step_run(args: argparse.Namespace):
    """open_run(--run-dir), with the options given on the command line applied (saved once the step succeeds).

    Local paths are made absolute now: the caches' settings name the model, and later steps may run elsewhere."""
    from ..run import open_run
    from ..run.open import tiny_data_for_base

    run = open_run(args.run_dir, profile=args.profile, create=False)
    data = {k: getattr(args, k) for k in DATA_ARGS if getattr(args, k, None) is not None}
    model = {k: getattr(args, a) for k, a in (("model_id", "model"), ("revision", "revision"), ("base", "base"))
             if getattr(args, a, None) is not None}
    run.config = tiny_data_for_base(run.config.replace(data=data, model=model).with_local_paths_resolved())
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
    from ..data.embeddings import embed_step

    run = _open_step_run(args)
    with _first_step(run.dir.root), run.writing("embed"):
        print(embed_step(run, overwrite=args.overwrite))
        run.save()  # config.json describes the caches it sits next to
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from ..data.captions import caption_step

    run = _open_step_run(args)  # with --captioner
    with _first_step(run.dir.root), run.writing("caption"):
        print(caption_step(run, overwrite=args.all, trigger=args.trigger))
        run.save()  # the folder captioned is the dataset the next steps read
    return 0


def cmd_latents(args: argparse.Namespace) -> int:
    from ..data.latents import latents_step

    run = _open_step_run(args)
    if not run.dir.config.is_file():
        raise FluxnbError(f"{run.dir.root} has no config.json: run notebook 01 first (`python -m fluxnb embed "
                          f"--run-dir {run.dir.root} --dataset ...`), which checks the data and creates it.")
    with run.writing("latents"):
        print(latents_step(run, overwrite=args.overwrite))
        run.save()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..run import open_existing_run
    from ..train import presets, train

    run = open_existing_run(args.run_dir, "train")
    adapter = {"lora": {"type": args.lora_type}, "train": {"ema_decay": args.ema_decay}}  # before the preset plans
    run.config = run.config.replace(**{part: {k: v for k, v in values.items() if v is not None}
                                       for part, values in adapter.items()})  # saved by train once its checks pass
    planned = presets.plan_if_unplanned(run.config, run.hw)  # a run no form planned: this machine's preset
    if planned:
        print(f"fluxnb: training settings from the {planned!r} preset (fluxnb.train.presets), saved to config.json")
        run.save()
    given = {k: getattr(args, k) for k in TRAIN_ARGS if getattr(args, k) is not None}  # after the preset: kept
    result = train(run, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps, settings=given,
                   live=False, how_to_resume=f"python -m fluxnb train --run-dir {run.dir.root} --resume")
    if result.interrupted:  # train said where the run stands; the command ends as every interrupted one does
        raise KeyboardInterrupt
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..infer.export import check_round_trip, export_lora, export_path
    from ..run import open_existing_run

    run = open_existing_run(args.run_dir)
    lora, out = args.lora or run.dir.lora_file, args.out or export_path(run.dir, args.format)
    inside = out.resolve().is_relative_to(run.dir.root.resolve())  # elsewhere, the run is only read: no lock
    with run.writing("export") if inside else contextlib.nullcontext():
        out = export_lora(lora, args.format, out)
    print(f"{args.format}: {out}")
    if args.format == "comfyui":
        print(check_round_trip(lora, out))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..run import open_existing_run
    from ..share.hub import HubSettings, push, stage, upload_blocker

    run = open_existing_run(args.run_dir)
    settings = HubSettings(repo_id=args.repo_id, private=not args.public, dry_run=args.dry_run,
                           trigger_word=args.trigger_word or "")
    blocker = None if args.dry_run else upload_blocker()
    with run.writing("push"):
        staged = stage(run, settings)
        if blocker:  # the reason first and alone: not after the model card's hundred lines (it is in RUN/hub/)
            print(f"nothing was uploaded: {blocker}.\n{staged}")
            return 1
        print(f"{staged}\n\n--- README.md (the model card) ---\n{staged.card}")
        result = push(run, staged, settings)
    print(result)
    return 0 if result.uploaded or args.dry_run else 1


# No abbreviations: argparse's default takes any unique prefix, so `--max-step 5` ran as --max-steps 5.
_Parser = functools.partial(argparse.ArgumentParser, allow_abbrev=False)


def _step_parser(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=f"{help}. Options not given keep their value in RUN/config.json; "
                                                    "those given are saved there.")
    for option in USES[name]:
        p.add_argument(option, default=None, **STEP_OPTIONS[option])
    p.set_defaults(func=func, parser=p)
    return p


def _front_parsers(sub) -> None:
    """The subcommands that are no notebook step: tiny and notebooks."""
    p = sub.add_parser("tiny", help="build the offline tiny FLUX pipeline and dataset")
    p.add_argument("--out", type=Path, required=True, help="folder to write model/ and dataset/ into")
    p.set_defaults(func=cmd_tiny, parser=p)

    p = sub.add_parser("notebooks", help="execute notebooks 01-05 in order (tiny profile without a GPU)")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR)
    p.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run, e.g. 01 02")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take (default: 3600)")
    p.set_defaults(func=cmd_notebooks, parser=p)


def _later_parsers(sub) -> None:
    """train, export and push: they read everything else from the trained run's config.json."""
    p = sub.add_parser("train", help="notebook 03: train the LoRA on the cached latents and embeddings")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR)
    p.add_argument("--max-steps", type=int, default=None,
                   help="total optimizer steps (saved as train.max_train_steps in RUN/config.json)")
    for option, kwargs in (ADAPTER_OPTIONS | TRAIN_OPTIONS).items():
        p.add_argument(option, default=None, **kwargs)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest intact RUN/checkpoints/step-N")
    mode.add_argument("--overwrite", action="store_true", help="start over: delete checkpoints, samples and LoRA")
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("export", help="notebook 04: write the LoRA for ComfyUI/Forge/kohya, or a diffusers copy")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR)
    p.add_argument("--format", choices=config.EXPORT_FORMATS, default="comfyui",
                   help="comfyui: kohya's key names, which ComfyUI, Forge and kohya's sd-scripts load (default); "
                        "diffusers: a copy of the trained file")
    p.add_argument("--lora", type=Path, default=None, help="LoRA file (default: RUN/lora/pytorch_lora_weights.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: RUN/export/<run>_comfyui.safetensors)")
    p.set_defaults(func=cmd_export, parser=p)

    p = sub.add_parser("push", help="notebook 05: model card + upload to the Hub (private; --dry-run lists the files)")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR)
    p.add_argument("--repo-id", required=True, help="'name' (your account) or 'user-or-org/name'")
    p.add_argument("--dry-run", action="store_true", help="only list the files and print the card")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--trigger-word", default=None, help="trigger word for the card (default: from the captions)")
    p.set_defaults(func=cmd_push, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fluxnb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _front_parsers(sub)
    _step_parser(sub, "caption", "notebook 01: caption the images of a local folder that have no caption", cmd_caption)
    p = sub.choices["caption"]
    p.add_argument("--all", action="store_true", help="caption every image, replacing the captions already there")
    p.add_argument("--trigger", default=None, help="words put before each new caption (default: --instance-prompt)")
    p.add_argument("--captioner", default=None, help="captioning model: Florence-2, Qwen-VL or BLIP (default: "
                                                 "florence-community/Florence-2-large)")
    _step_parser(sub, "embed", "notebook 01: check the dataset, cache CLIP + T5 caption embeddings", cmd_embed)
    _step_parser(sub, "latents", "notebook 02: cache VAE latents of every training image (model and dataset "
                                 "from RUN/config.json)", cmd_latents)
    _later_parsers(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The subcommand's arguments. An unknown option prints the subcommand's usage (argparse's would be the top
    level's, which lists no option) with the nearest option it has, and exits with status 2."""
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        options = [o for action in args.parser._actions for o in action.option_strings]
        near = [difflib.get_close_matches(e.split("=")[0], options, n=1) for e in extras if e.startswith("-")]
        args.parser.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(f" (did you mean {n[0]}?)"
                                                                                 for n in near if n))
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except FluxnbError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@watching_interrupts  # from the first line: a Ctrl-C swallowed by a __del__ at start-up still stops the command,
def _run(argv: list[str] | None) -> int:  # and one swallowed after the step's last check is raised as it returns
    args = parse(argv)
    return args.func(args)
