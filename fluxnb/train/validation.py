"""When to stop: a validation loss on images kept out of training, and the best checkpoint by it.

    val = Validation(run, table, latent)          # splits samples.jsonl: val.train_ids go to TrainingData
    if val.due(step, target): row["val_loss"] = val.loss(model, autocast)   # fixed noise, fixed timesteps
    best_lora(run.dir)                            # notebook 04: the LoRA of the best checkpoint

The split is by sample id, seeded (train.seed): the same images are held out on every run and every resume, and a
flipped copy goes with its original (else the model would train on the mirror of a validation image). With
train.validation_samples = 0 (a dataset too small to spare any), the loss is measured on a fixed subset of the
training images instead: it then shows the model fitting them, not generalising, and a note says so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..base.errors import FluxnbError
from ..data.store import read_samples
from ..run import RunDir
from ..run.records import MetricsLog
from . import checkpoint
from .batches import TrainingData
from .step import evaluate

VALIDATION_SEED = 4321  # the noise, timesteps and latent draws of every validation loss: one fixed set
RISE_HINT = 3  # evaluations in a row above the best so far before the hint
TRAINING_SUBSET = 4  # images measured when none is held out


def _group(sample_id: str) -> str:
    return sample_id.removesuffix("-flip")  # a flipped copy belongs with its original


def _first(sample_ids: list[str], n: int, seed: int) -> set[str]:
    """The n images first in a seeded order of their ids (not of file order, which a user may change)."""
    groups = sorted({_group(i) for i in sample_ids}, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    return set(groups[:n])


def holdout(sample_ids: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(training ids, held-out ids): n images held out, with their flipped copies."""
    groups = {_group(i) for i in sample_ids}
    if n >= len(groups):
        raise FluxnbError(f"train.validation_samples={n} would hold out every one of the {len(groups)} images: set "
                          f"it below {len(groups)} (0 measures the validation loss on training images instead).")
    held = _first(sample_ids, n, seed)
    return [i for i in sample_ids if _group(i) not in held], [i for i in sample_ids if _group(i) in held]


class Validation:
    """The held-out images and their loss at fixed noise, measured every train.validate_every steps."""

    def __init__(self, run, table, latent, history: list[dict] | None = None, upto: int = 0,
                 samples: list | None = None) -> None:
        tc = run.config.train
        self.tc, self.table, self.latent, self.hw = tc, table, latent, run.hw
        samples = read_samples(run.dir) if samples is None else samples  # samples.jsonl, maybe read already
        ids = [s.id for s in samples]
        if tc.validation_samples:
            self.train_ids, held = holdout(ids, tc.validation_samples, tc.seed)
            self.note = f"validation: {len(held)} sample(s) held out of training ({len(self.train_ids)} train)"
        else:
            subset = _first(ids, TRAINING_SUBSET, tc.seed)
            self.train_ids, held = None, [i for i in ids if _group(i) in subset]
            self.note = (f"validation: validation_samples=0, so the validation loss is measured on {len(held)} "
                         "TRAINING images: it shows the LoRA fitting them, not how it does on new ones")
        self.data = TrainingData(run.dir, 1, tc.seed, only=held, samples=samples) if tc.validate_every else None
        # (step, loss) measured so far: metrics.jsonl's rows up to the step training resumes from
        self.history = [(r["step"], r["val_loss"]) for r in history or [] if "val_loss" in r and r["step"] <= upto]
        self._hinted = False

    def due(self, step: int, target: int) -> bool:
        """Every validate_every steps, at every checkpoint (so each has a val_loss to rank by), at the end."""
        if self.data is None:
            return False
        every, ckpt = self.tc.validate_every, self.tc.checkpoint_every
        return step % every == 0 or bool(ckpt and step % ckpt == 0) or step == target

    def loss(self, model, step: int, autocast) -> float:
        value = evaluate(model, self.data, self.table, self.tc, self.latent, self.hw, limit=None,
                         seed=VALIDATION_SEED, autocast=autocast)
        self.history.append((step, value))
        hint = rising(self.history)
        if hint and not self._hinted:
            print(f"\nfluxnb: {hint}")
            self._hinted = True
        return value

    def at(self, step: int) -> float | None:
        return next((v for s, v in reversed(self.history) if s == step), None)


def rising(history: list[tuple[int, float]], n: int = RISE_HINT) -> str | None:
    """A hint when the last n validation losses all sit above the best one before them (overfitting)."""
    if len(history) <= n:
        return None
    best_step, best = min(history[:-n], key=lambda sv: sv[1])
    if all(v > best for _, v in history[-n:]) and history[-1][1] > history[-n][1]:
        return (f"the validation loss has been above its best ({best:.4f} at step {best_step}) for {n} evaluations "
                f"(now {history[-1][1]:.4f}): the LoRA may be learning the training images by heart. Consider "
                "stopping; notebook 04 can load the best checkpoint (fluxnb.train.validation.best_lora).")
    return None


def best_lora(run: RunDir) -> Path | None:
    """The LoRA file of the checkpoint with the lowest validation loss (kept by checkpoint pruning), or None."""
    best = checkpoint.best(run)
    return best.path / run.lora_file.name if best else None


def summary(run: RunDir, best: checkpoint.Checkpoint | None = None) -> str:
    """Which checkpoint is best by validation loss (`best`, if the caller found it already), for the end of
    training."""
    best = best or checkpoint.best(run)
    rows = [r for r in MetricsLog(run.metrics).read() if "val_loss" in r]
    if best is None or not rows:
        return "fluxnb: no validation loss was measured (train.validate_every = 0): no best checkpoint to name."
    last = rows[-1]
    return (f"fluxnb: best checkpoint by validation loss: {best.path.name} (val_loss {best.info()['val_loss']:.4f}; "
            f"last, step {last['step']}: {last['val_loss']:.4f}). Notebook 04 loads it with best_lora(run.dir).")
