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
                                       other data), written last

Sizes for FLUX.1-dev, rank 4 attention: LoRA 18.7 MB (fp32), 8-bit AdamW state ~9.5 MB (AdamW: 37 MB; Prodigy:
~75 MB, and its step-size estimate d, saved with its param groups). The folder is built as step-N.tmp and renamed
into place, so a Colab disconnect mid-save leaves the previous one intact. What can still damage one afterwards (a
full Drive, a sync that stopped, a hand-copied file) is caught by `verify` before a resume uses it: `newest_intact`
finds the checkpoint to resume from, `set_aside` renames the damaged newer ones to step-N.damaged (kept for the
user, never deleted by a resume).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..base.files import atomic_path, atomic_write_text, disk_errors
from ..config import CONFIG_FILE, RunConfig
from ..model.lora import load_lora_, save_lora
from ..run import LORA_FILE, RunDir
from .state import TrainState

STATE_FILE = "training_state.pt"
INFO_FILE = "state.json"  # step, loss, lr, the data fingerprint, val_loss: what a checkpoint says of itself
_NAME = re.compile(r"^step-(\d+)$")
_OWN = re.compile(r"^step-\d+(\.tmp|\.old|\.damaged(-\d+)?)?$")  # a checkpoint, a killed save's rest, a damaged one


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


def _step_folders(run: RunDir) -> list[Checkpoint]:
    """Every step-N folder, oldest first, complete or not."""
    if not run.checkpoints.is_dir():
        return []
    found = [Checkpoint(p, int(m.group(1))) for p in run.checkpoints.iterdir() if (m := _NAME.match(p.name))]
    return sorted((c for c in found if c.path.is_dir()), key=lambda c: c.step)


def list_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Complete checkpoints (with a state.json), oldest first; `verify` says whether one can be resumed."""
    return [c for c in _step_folders(run) if (c.path / INFO_FILE).is_file()]


def verify(ckpt: Checkpoint) -> str | None:
    """What keeps `ckpt` from being resumed, in a few words, or None when it is intact: all four files there and
    readable, one step in the folder's name, state.json and training_state.pt (so a state.json copied from another
    step is caught), and every LoRA weight and optimizer number finite (a NaN would stop the resumed run at its
    first step). It reads the whole checkpoint: ~30 MB for FLUX.1-dev, little next to a resume that fails."""
    readers = {INFO_FILE: ckpt.info, CONFIG_FILE: ckpt.config, LORA_FILE: lambda: load_file(ckpt.path / LORA_FILE),
               STATE_FILE: ckpt.training_state}
    loaded = {}
    for name, read in readers.items():
        path = ckpt.path / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{name} is {'empty' if path.is_file() else 'missing'}"
        try:
            loaded[name] = read()
        except Exception:  # whatever a damaged file raises: JSON, zip, pickle, safetensors or config errors
            return f"{name} cannot be read (truncated or damaged)"
    for name in (INFO_FILE, STATE_FILE):
        step = loaded[name].get("step") if isinstance(loaded[name], dict) else None
        if type(step) is not int or step != ckpt.step:
            return f"{name} says step {step}, the folder's name step {ckpt.step}"
    for name in (LORA_FILE, STATE_FILE):
        bad = next((key for key, t in _float_tensors(loaded[name]) if not torch.isfinite(t).all()), None)
        if bad is not None:
            return f"{name} holds NaN or infinite numbers (first: {bad})"
    return None


def _float_tensors(obj: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(where, tensor) for every floating-point tensor in nested dicts and lists: the LoRA, the optimizer moments
    (not the RNG's byte state)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{key}[{i}]")


def newest_intact(run: RunDir) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest checkpoint that verifies (or None), and the damaged ones newer than it with what is wrong with
    each, newest first. A step-N folder without state.json counts as damaged: `save` renames only whole folders
    into place, so nothing but damage leaves one."""
    damaged = []
    for ckpt in reversed(_step_folders(run)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def aside_name(path: Path) -> Path:
    """Where `set_aside` moves a damaged step-N: step-N.damaged, or step-N.damaged-2, ... if that is taken."""
    target, n = path.with_name(f"{path.name}.damaged"), 2
    while target.exists():
        target, n = path.with_name(f"{path.name}.damaged-{n}"), n + 1
    return target


def set_aside(run: RunDir, after: int) -> None:
    """Rename every step-N folder newer than step `after` (the damaged ones a resume skipped) by `aside_name`.

    Kept for the user, but no longer a checkpoint: else pruning would count it among the newest and delete the
    intact one the run resumed from, the run's own step-N would replace it, and every resume would report it."""
    for ckpt in _step_folders(run):
        if ckpt.step > after:
            ckpt.path.rename(aside_name(ckpt.path))


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
