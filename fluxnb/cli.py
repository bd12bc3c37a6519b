"""`python -m fluxnb`: the headless mirror of the notebooks, one subcommand per step.

    python -m fluxnb tiny --out DIR          build the offline tiny FLUX model + dataset
    python -m fluxnb notebooks               run notebooks 01-05 top to bottom (the whole series)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import FluxnbError

Command = Callable[[argparse.Namespace], int]


def cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import build_tiny

    assets = build_tiny(args.out)
    print(f"model:   {assets.model}\ndataset: {assets.dataset}")
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    from .notebooks import run_notebooks

    return run_notebooks(args.run_dir, only=args.only, timeout=args.timeout)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FluxnbError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
