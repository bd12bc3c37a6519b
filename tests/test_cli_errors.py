"""Every mistake a user can make and fix reaches the command line as one line saying what to do, never a traceback.

Each case is a real CLI call (`fluxnb.cli.main`) on the tiny profile. Before the layout change, the hardware,
quantization and LoRA cases raised plain ValueErrors that the CLI's handler did not catch.
"""

from __future__ import annotations

import json

import pytest

from fluxnb.cli import main
from train_helpers import make_run


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


@pytest.mark.parametrize("command", ["embed", "caption", "train"])
def test_a_run_dir_that_is_a_file_is_one_line(command, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert main([command, "--run-dir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "notes.txt" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "not a run"
