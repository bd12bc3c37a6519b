"""What a new user meets on a first try: re-running a finished series, an empty run folder, a missing notebook
runner, and library noise on every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


def _fake_setup(tmp_path: Path, cpu_index_up: bool) -> list[str]:
    """scripts/setup.sh on a Linux box without CUDA and without torch, with python3 and nvidia-smi faked: the pip
    calls it makes, one per line."""
    log, bin_dir = tmp_path / "calls.txt", tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # no driver
    refuse = "" if cpu_index_up else 'case "$*" in *download.pytorch.org*) exit 1;; esac\n'
    (bin_dir / "py").write_text(f'#!/bin/bash\necho "$*" >> {log}\n[ "$*" = "-c import torch" ] && exit 1\n{refuse}exit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**__import__("os").environ, "PYTHON": str(bin_dir / "py"), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in log.read_text().splitlines() if "pip install" in line and "torch==" in line]


@pytest.mark.skipif(sys.platform != "linux", reason="setup.sh picks the CPU index on Linux only")
def test_setup_installs_the_cpu_build_of_torch_without_cuda_and_falls_back_offline(tmp_path):
    calls = _fake_setup(tmp_path / "up", cpu_index_up=True)
    assert len(calls) == 1 and "--index-url https://download.pytorch.org/whl/cpu" in calls[0]
    assert "--timeout" in calls[0]  # an unreachable index costs seconds, never a hang
    calls = _fake_setup(tmp_path / "down", cpu_index_up=False)
    assert len(calls) == 2 and "download.pytorch.org" not in calls[1] and "torch==2.13.0" in calls[1]


def test_readme_says_how_to_open_the_notebooks_in_jupyterlab():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("jupyterlab") for req in extras["jupyter"])
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[jupyter]"' in readme and "jupyter lab notebooks/" in readme
    assert all(pin in readme for pin in ("diffusers | ==0.42.1", "bitsandbytes | ==0.50.2", "datasets | ==5.2.0"))


def test_a_kernel_that_dies_gets_one_line_naming_its_cell(tmp_path, monkeypatch, capsys):
    """A notebook whose kernel is killed (as the OOM killer does at a RAM limit): no DeadKernelError traceback, but
    which cell was running, the likely cause, and the executed part kept."""
    import nbformat

    from fluxnb.nb import runner

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"), nbformat.v4.new_code_cell("y = 2")])
    path = tmp_path / "notebooks" / "09_dies.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    monkeypatch.setattr(runner, "notebook_paths", lambda only=None: [path])
    assert runner.run_notebooks(tmp_path / "run", timeout=120) == 1
    out = capsys.readouterr().out
    assert "09_dies.ipynb: the kernel died while running code cell 2 (`import os, signal`)" in out
    assert "ran out of RAM" in out and "Traceback" not in out
    executed = nbformat.read(tmp_path / "run" / "executed" / path.name, as_version=4)
    assert executed.cells[0].execution_count == 1 and executed.cells[2].execution_count is None
