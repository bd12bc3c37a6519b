"""What a new user meets on a first try: re-running a finished series, an empty run folder, a missing notebook
runner, and library noise on every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from train_helpers import make_run

from fluxnb.cli import main
from fluxnb.train import train

REPO = Path(__file__).resolve().parents[1]


def test_a_finished_run_says_it_is_trained_and_keeps_its_numbers(tmp_path, tmp_path_factory, capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train={"max_train_steps": 2, "sample_every": 0})
    first = train(run, live=False)
    rows = run.dir.metrics.read_text()
    capsys.readouterr()

    again = train(run, live=False)  # what re-running notebook 03 (or the whole series) does

    out = capsys.readouterr().out
    assert again.already_trained and again.step == 2 and again.lora == run.dir.lora_file
    assert "is already trained (step 2 of 2" in out and "resuming" not in out
    assert (again.train_loss_before, again.train_loss_after) == (first.train_loss_before, first.train_loss_after)
    assert str(again).startswith(f"training-set loss, fixed noise: {first.train_loss_before:.4f} -> ")
    assert run.dir.metrics.read_text() == rows  # nothing was trained or logged
    more = train(run, live=False, max_steps=3)  # a higher total trains on from the checkpoint
    assert more.step == 3 and not more.already_trained


def test_train_on_an_empty_folder_says_to_run_notebooks_01_and_02(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "notebooks 01 and 02 have not run there" in err and "python -m fluxnb embed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_notebooks_without_nbclient_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nbclient", None)  # as with requirements.txt alone: no nbclient installed
    assert main(["notebooks", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs nbclient" in err and "pip install -r requirements-dev.txt" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_importing_the_libraries_prints_no_known_noise():
    """torchao (imported by diffusers), torch's pytree and transformers' torchvision fallback stay quiet, while other
    warnings of the same loggers still show."""
    code = ("import logging, fluxnb.run, fluxnb.train, fluxnb.infer.sampling\n"
            "from diffusers import FluxPipeline\n"
            "logging.getLogger('torchao').warning('a torchao warning that matters')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    from test_notebooks import NOISE

    printed = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in printed], printed
    assert "a torchao warning that matters" in printed
