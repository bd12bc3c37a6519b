"""A damaged newest checkpoint (issue 27, finding 9): a resume verifies before it trusts one, says in one line what
is wrong and goes on from the newest intact checkpoint, keeping the damaged folder as step-N.damaged. When none is
intact it says so and how to start over; a stopped run's message names only a checkpoint that verifies.
Tiny profile, CPU: one run stopped after step 2 of 3 (checkpoints step-1 and step-2), copied for each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import make_run

from fluxnb.cli import main
from fluxnb.run import open_run
from fluxnb.train import TrainingDiverged, checkpoint, step, train
from fluxnb.train.session import TrainingOutOfMemory

LORA, STATE, INFO, CONFIG = "pytorch_lora_weights.safetensors", "training_state.pt", "state.json", "config.json"
SETTINGS = {"max_train_steps": 3, "sample_every": 0, "checkpoint_every": 1, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after optimizer step 2 of 3, with intact checkpoints step-1 and step-2."""
    run = make_run(tmp_path_factory.mktemp("stopped") / "run", tmp_path_factory, train=SETTINGS)
    assert train(run, stop_after=2, live=False).step == 2
    return run.dir.root


def _copy(stopped: Path, tmp_path: Path):
    shutil.copytree(stopped, tmp_path / "run")
    return open_run(tmp_path / "run", verbose=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_lora(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    weights = load_file(path)
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, path, metadata=metadata)


def _nan_optimizer(path: Path) -> None:
    """NaN in the first parameter's Adam moments (bitsandbytes nests them under its quant state; an 8-bit
    moment is uint8 codes times float absmax)."""
    state = torch.load(path, weights_only=True)
    moments = state["optimizer"]["state"][0]
    moments = moments.get("__bnb_optimizer_quant_state__", moments)
    moment = next(v for k, v in moments.items() if k in ("exp_avg", "state1", "absmax1") and v.is_floating_point())
    moment.fill_(float("nan"))
    torch.save(state, path)


DAMAGE = {  # what happens to step-2, and what the one line must say about it
    "empty LoRA": (lambda d: (d / LORA).write_bytes(b""), f"{LORA} is empty"),
    "truncated LoRA": (lambda d: _truncate(d / LORA), f"{LORA} cannot be read"),
    "missing LoRA": (lambda d: (d / LORA).unlink(), f"{LORA} is missing"),
    "NaN in the LoRA": (lambda d: _nan_lora(d / LORA), f"{LORA} holds NaN"),
    "empty optimizer state": (lambda d: (d / STATE).write_bytes(b""), f"{STATE} is empty"),
    "truncated optimizer state": (lambda d: _truncate(d / STATE), f"{STATE} cannot be read"),
    "missing optimizer state": (lambda d: (d / STATE).unlink(), f"{STATE} is missing"),
    "NaN in the optimizer state": (lambda d: _nan_optimizer(d / STATE), f"{STATE} holds NaN"),
    "empty state.json": (lambda d: (d / INFO).write_text(""), f"{INFO} is empty"),
    "state.json not JSON": (lambda d: (d / INFO).write_text('{"step": 2, "loss": '), f"{INFO} cannot be read"),
    "missing state.json": (lambda d: (d / INFO).unlink(), f"{INFO} is missing"),
    "state.json not an object": (lambda d: (d / INFO).write_text('["step", 2]'), f"{INFO} says step None"),
    "state.json of an older step": (lambda d: shutil.copy(d.with_name("step-1") / INFO, d / INFO),
                                    f"{INFO} says step 1, the folder's name step 2"),
    "optimizer state of an older step": (lambda d: shutil.copy(d.with_name("step-1") / STATE, d / STATE),
                                         f"{STATE} says step 1, the folder's name step 2"),
    "config.json not JSON": (lambda d: (d / CONFIG).write_text("{"), f"{CONFIG} cannot be read"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_kept_and_the_run_resumes_from_the_intact_one(kind, stopped, tmp_path,
                                                                                          capsys):
    run = _copy(stopped, tmp_path)
    newest = run.dir.checkpoints / "step-2"
    intact_lora = {k: v.clone() for k, v in load_file(newest / LORA).items()}  # not mapped: damage rewrites it
    damage, says = DAMAGE[kind]
    damage(newest)
    damaged = _files(newest)
    capsys.readouterr()
    result = train(run, resume=True, live=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged checkpoint" in line]
    assert len(lines) == 1, lines
    assert f"step-2 ({says}" in lines[0] and "resuming from step-1" in lines[0] and "step-2.damaged" in lines[0], lines
    assert result.step == 3 and run.dir.lora_file.is_file()
    assert _files(run.dir.checkpoints / "step-2.damaged") == damaged, "the damaged checkpoint was changed or deleted"
    assert [c.step for c in checkpoint.list_checkpoints(run.dir)] == [2, 3]  # step-1 pruned only after 2 and 3
    assert all(checkpoint.verify(c) is None for c in checkpoint.list_checkpoints(run.dir))
    redone = load_file(run.dir.checkpoints / "step-2" / LORA)  # step 2 trained again gives the same LoRA
    assert redone.keys() == intact_lora.keys() and all(torch.equal(redone[k], intact_lora[k]) for k in redone)


def test_no_intact_checkpoint_says_so_in_one_line_and_how_to_start_over(stopped, tmp_path, capsys):
    run = _copy(stopped, tmp_path)
    (run.dir.checkpoints / "step-2" / STATE).write_bytes(b"")
    _truncate(run.dir.checkpoints / "step-1" / LORA)
    before = {p: p.read_bytes() for p in run.dir.root.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run.dir.root), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "can be resumed" in err and f"step-2 ({STATE} is empty)" in err and f"step-1 ({LORA} cannot" in err, err
    assert "--overwrite" in err and "new run directory" in err, err
    assert {p: p.read_bytes() for p in before} == before  # nothing renamed, nothing written


@pytest.mark.parametrize("failure", ["diverged", "out of memory"])
def test_a_stopped_runs_message_names_a_checkpoint_that_verifies(failure, stopped, tmp_path, monkeypatch):
    """step-2 is damaged on disk after this call resumed from it (a full Drive, a sync): step 3 then fails, and
    its message must offer step-1, the checkpoint a resume would take, not step-2."""
    run = _copy(stopped, tmp_path)

    def failing_step(*args, **kwargs):
        (run.dir.checkpoints / "step-2" / STATE).write_bytes(b"")
        if failure == "diverged":
            raise step.Diverged("loss became nan")
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(step, "optimizer_step", failing_step)
    error = TrainingDiverged if failure == "diverged" else TrainingOutOfMemory
    with pytest.raises(error) as stopped_run:
        train(run, resume=True, live=False)
    message = str(stopped_run.value)
    assert f"checkpoint is {run.dir.checkpoints / 'step-1'}" in message and "step-2" not in message, message


def test_overwrite_removes_set_aside_checkpoints_and_says_so(stopped, tmp_path, capsys):
    run = _copy(stopped, tmp_path)
    (run.dir.checkpoints / "step-2").rename(run.dir.checkpoints / "step-2.damaged")  # set aside by an earlier resume
    capsys.readouterr()
    train(run, overwrite=True, live=False)
    out = capsys.readouterr().out
    assert "1 damaged checkpoint(s) set aside (step-2.damaged)" in out, out
    assert not (run.dir.checkpoints / "step-2.damaged").exists()
