"""Resumable training checkpoints: RUN/checkpoints/step-N/, written whole or not at all.

A checkpoint holds everything that decides the rest of the run, so resuming reproduces the uninterrupted run:

    pytorch_lora_weights.safetensors   the LoRA (stock diffusers format: loadable for inference as it is); with
                                       train.ema_decay > 0 the EMA of its weights, as the final LoRA will be
    training_state.pt                  optimizer moments, LR-schedule position, fp16 loss scale, torch's global
                                       RNG (LoRA dropout), and the optimizer step, which fixes the data order
                                       and every draw of noise, timesteps and latents (fluxnb.train.batches);
                                       with EMA, the average's state and the weights being trained
                                       (fluxnb.train.state)
    config.json                        the run's config at that moment (to refuse resuming with another LoRA)
    state.json                         step, loss, lr, the training set's fingerprint (to refuse resuming on
                                       other data), written last: a folder without it is incomplete

Sizes for FLUX.1-dev, rank 4 attention: LoRA 18.7 MB (fp32), 8-bit AdamW state ~9.5 MB (AdamW: 37 MB). The folder
is built as step-N.tmp and renamed into place, so a Colab disconnect mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base.files import atomic_path, atomic_write_text, disk_errors
from ..config import RunConfig
from ..model.lora import load_lora_, save_lora
from ..run import RunDir
from .state import TrainState

STATE_FILE = "training_state.pt"
INFO_FILE = "state.json"  # step, loss, lr, the data fingerprint, val_loss: what a checkpoint says of itself
_NAME = re.compile(r"^step-(\d+)$")
_OWN = re.compile(r"^step-\d+(\.tmp|\.old)?$")  # a checkpoint, or what a killed save left of one


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / INFO_FILE).read_text())

    def config(self) -> RunConfig:
        return RunConfig.load(self.path)

    def training_state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)


def list_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    if not run.checkpoints.is_dir():
        return []
    found = []
    for path in run.checkpoints.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / INFO_FILE).is_file():
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def own_folders(run: RunDir) -> list[Path]:
    """Every folder fluxnb wrote in checkpoints/: complete checkpoints and leftovers of a stopped save."""
    if not run.checkpoints.is_dir():
        return []
    return sorted(p for p in run.checkpoints.iterdir() if _OWN.match(p.name) and p.is_dir() and not p.is_symlink())


def latest(run: RunDir) -> Checkpoint | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def best(run: RunDir) -> Checkpoint | None:
    """The complete checkpoint with the lowest validation loss (state.json's val_loss), the earliest on a tie."""
    scored = [(c.info().get("val_loss"), c.step, c) for c in list_checkpoints(run)]
    scored = [s for s in scored if isinstance(s[0], (int, float))]
    return min(scored, key=lambda s: s[:2])[2] if scored else None


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(run: RunDir, config: RunConfig, state: TrainState, *, info: dict[str, Any], keep: int) -> Checkpoint:
    """Write checkpoints/step-{state.step}/ atomically, then delete all but the newest `keep` checkpoints and the
    best one by validation loss (notebook 04 may load it).

    Whatever stops it (a full disk, Ctrl-C) removes its step-N.tmp and leaves the earlier checkpoints as they were."""
    step = state.step
    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f"step-{step}.tmp"
    for stale in run.checkpoints.glob("step-*.tmp"):  # left by a kill mid-save; never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    previous = latest(run)
    try:
        with disk_errors(run.checkpoints, folder_size(previous.path) if previous else None):
            tmp.mkdir(parents=True)
            with state.averaged():  # the LoRA to use at this step: with EMA on, the average
                save_lora(state.model, tmp)
            # Through a Python file: torch's own writer (given a path) reports a full disk as a bare RuntimeError.
            with atomic_path(tmp / STATE_FILE) as part, open(part, "wb") as f:
                torch.save(state.state_dict(), f)
            config.save(tmp)
            atomic_write_text(tmp / INFO_FILE, json.dumps({"step": step, **info}, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f"step-{step}.old")
    if final.exists():  # re-saving the same step (e.g. the final one after a resume): swap, then delete
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    keep_best = best(run)
    for expired in list_checkpoints(run)[:-keep]:
        if keep_best is None or expired.path != keep_best.path:
            shutil.rmtree(expired.path, ignore_errors=True)
    return Checkpoint(final, step)


def annotate(checkpoint: Checkpoint, **info: Any) -> None:
    """Add numbers to a checkpoint's state.json (rewritten atomically), e.g. the loss measured after the last step."""
    atomic_write_text(checkpoint.path / INFO_FILE,
                      json.dumps(checkpoint.info() | info, indent=2, sort_keys=True) + "\n")


def restore(checkpoint: Checkpoint, state: TrainState) -> None:
    """Everything `save` wrote goes back where it came from: the LoRA weights into the adapter, then the rest
    (with EMA, the weights being trained replace the average the LoRA file held)."""
    load_lora_(state.model, checkpoint.path)
    state.load_state_dict(checkpoint.training_state())
