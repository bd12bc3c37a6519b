"""Every mistake a user can make and fix reaches the command line as one line saying what to do, never a traceback.

Each case is a real CLI call (`fluxnb.cli.main`) on the tiny profile. Before the layout change, the hardware,
quantization and LoRA cases raised plain ValueErrors that the CLI's handler did not catch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxnb.cli import build_parser, main
from train_helpers import make_run

ROOT = Path(__file__).resolve().parents[1]


def _no_nf4_folder(run, tmp_path):
    folder = tmp_path / "plain"  # a transformer folder whose config has no NF4 quantization_config
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    return {"model": {"prequantized": str(folder)}}


def _wrong_lora_for_resume(run, tmp_path):
    assert main(["train", "--run-dir", str(run.dir.root), "--max-steps", "1"]) == 0
    ckpt = next(run.dir.checkpoints.iterdir())
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace('"rank": 16', '"rank": 2'))
    return {}


CASES = {  # name -> (how to break the run, command line after --run-dir RUN, what the message must say)
    "unknown FLUXNB_PROFILE": (None, ["train"], "FLUXNB_PROFILE='huge' is not a profile"),
    "LoRA targets that match nothing": (lambda run, tmp: {"lora": {"targets": "no_such_layer"}}, ["train"],
                                        "match no layer"),
    "a prequantized folder that is not NF4": (_no_nf4_folder, ["train"], "is not an NF4 checkpoint"),
    "resume on another LoRA": (_wrong_lora_for_resume, ["train", "--resume"], "trained with LoRA"),
    "export without a LoRA": (None, ["export"], "does not exist: train a LoRA first"),
    "push to an invalid repo id": (None, ["push", "--repo-id", "bad//name", "--dry-run"], "is not a valid Hub name"),
    "a broken config.json": (lambda run, tmp: run.dir.config.write_text("{") and {}, ["latents"], "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_says_one_line_and_no_traceback(case, tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    breaker, args, message = CASES[case]
    run = make_run(tmp_path / "run", tmp_path_factory, train={"max_train_steps": 1, "sample_every": 0})
    changes = breaker(run, tmp_path) if breaker else {}
    if changes:
        run.config = run.config.replace(**changes)
        run.save()
    if case == "unknown FLUXNB_PROFILE":
        monkeypatch.setenv("FLUXNB_PROFILE", "huge")
    capsys.readouterr()
    code = main([args[0], "--run-dir", str(run.dir.root), *args[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


# --help and argument mistakes answer at once: nothing heavy is imported before a subcommand runs (issue 26.5).
_QUICK = [["--help"], *([sub, "--help"] for sub in ("tiny", "notebooks", "caption", "embed", "latents", "train",
                                                      "export", "push")),
          ["train", "--max-step", "5"], ["latents", "--with", "96"], ["export", "--format", "kohya"],
          ["notebooks", "--only", "06"]]
_PROBE = """
import contextlib, io, json, sys
from fluxnb.cli import main
heavy = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    heavy[" ".join(argv)] = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
print(json.dumps(heavy))
"""


def test_help_and_argument_errors_import_no_torch():
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(_QUICK)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy = {argv: mods for argv, mods in json.loads(proc.stdout).items() if mods}
    assert not heavy, f"imported before the subcommand ran: {heavy}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in action._choices_actions), "a subcommand has no help line"
    return dict(action.choices)


def test_every_subcommand_and_option_has_a_help_line():
    bare = [f"{name} {action.option_strings[-1]}" for name, parser in _subparsers().items()
            for action in parser._actions if action.option_strings and not action.help]
    assert not bare, f"options without a help line: {bare}"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def test_latents_and_caption_list_only_the_options_they_read():
    parsers = _subparsers()
    assert not _options(parsers["latents"]) & {"--model", "--dataset", "--instance-prompt", "--image-column",
                                               "--caption-column", "--max-sequence-length"}
    assert not _options(parsers["caption"]) & {"--width", "--height", "--crop", "--flip", "--buckets",
                                               "--bucket-step", "--small-images", "--bad-images", "--overwrite",
                                               "--image-column"}
    assert {"--flip", "--crop", "--width"} <= _options(parsers["latents"])


@pytest.mark.parametrize("argv, meant", [(["train", "--max-step", "5"], "--max-steps"),  # was taken as --max-steps
                                         (["train", "--res"], "--resume"),
                                         (["latents", "--with", "96"], "--width")])
def test_no_abbreviations_and_a_mistyped_option_gets_its_subcommands_usage_and_a_suggestion(argv, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"usage: python -m fluxnb {argv[0]} " in err, err
    assert f"unrecognized arguments: {' '.join(argv[1:])} (did you mean {meant}?)" in err, err


def test_notebooks_only_an_unknown_prefix_says_which_notebooks_exist(capsys):
    assert main(["notebooks", "--only", "06"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no notebook's name starts with '06'") and "01_embeddings" in err
    assert "05_share_to_hub" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["embed", "caption", "train"])
def test_a_run_dir_that_is_a_file_is_one_line(command, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert main([command, "--run-dir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "notes.txt" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "not a run"
