"""Held-out validation (fluxnb.train.validation): a stable split, never trained on, the best checkpoint kept."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from train_helpers import make_run

from fluxnb.data import latents
from fluxnb.data.store import read_samples
from fluxnb.base.errors import FluxnbError
from fluxnb.train import checkpoint, step, train, validation
from fluxnb.train.validation import Validation, holdout, rising


def test_the_split_is_stable_by_id_and_keeps_flips_with_their_original():
    ids = [f"{i:04x}" for i in range(20)] + ["0003-flip", "0007-flip"]
    train_ids, held = holdout(ids, 3, seed=0)
    shuffled = random.Random(1).sample(ids, len(ids))
    assert sorted(holdout(shuffled, 3, seed=0)[1]) == sorted(held)  # by id, not by file order
    assert holdout(ids, 3, seed=1)[1] != held  # seeded
    assert not set(train_ids) & set(held) and sorted(train_ids + held) == sorted(ids)
    for original in ("0003", "0007"):  # an image and its mirror are on the same side
        assert (original in held) == (f"{original}-flip" in held)
    with pytest.raises(FluxnbError, match="validation_samples=20"):
        holdout(ids, 20, seed=0)


def _latent_key(tensor) -> str:
    return hashlib.sha256(tensor.float().contiguous().numpy().tobytes()).hexdigest()


def test_training_never_sees_a_held_out_image(tmp_path, tmp_path_factory, monkeypatch):
    run = make_run(tmp_path / "run", tmp_path_factory, train={
        "max_train_steps": 8, "batch_size": 2, "sample_every": 0, "checkpoint_every": 4, "validation_samples": 3,
        "validate_every": 2})
    owner = {_latent_key(latents.load_latent(run.dir, s.id)[0]): s.id for s in read_samples(run.dir)}
    seen = set()
    real_step = step.training_step

    def spy(model, batch, *args, **kwargs):
        if torch.is_grad_enabled():  # training; evaluate() (the held-out loss) runs without gradients
            seen.update(owner[_latent_key(m)] for m in batch["latent_mean"])
        return real_step(model, batch, *args, **kwargs)

    monkeypatch.setattr(step, "training_step", spy)
    result = train(run, live=False)
    _, held = holdout([s.id for s in read_samples(run.dir)], 3, run.config.train.seed)
    assert len(held) == 3 and seen and not seen & set(held), "a held-out image was trained on"
    assert len(seen) == 13  # 8 steps x 2 > 13: every training image was used
    rows = json.loads("[" + ",".join(run.dir.metrics.read_text().splitlines()) + "]")
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6, 8]
    assert all(c.info()["val_loss"] > 0 for c in checkpoint.list_checkpoints(run.dir))
    assert result.best_checkpoint == checkpoint.best(run.dir).path


def test_the_best_checkpoint_survives_pruning_and_is_named(tmp_path, tmp_path_factory, monkeypatch, capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train={
        "max_train_steps": 5, "sample_every": 0, "checkpoint_every": 1, "keep_checkpoints": 1,
        "validate_every": 1})
    losses = iter([0.5, 0.3, 0.4, 0.45, 0.6])

    def fake_loss(self, model, step, autocast):  # a run that overfits after step 2
        self.history.append((step, next(losses)))
        hint = rising(self.history)
        if hint:
            print(hint)
        return self.history[-1][1]

    monkeypatch.setattr(Validation, "loss", fake_loss)
    result = train(run, live=False)
    kept = [c.step for c in checkpoint.list_checkpoints(run.dir)]
    assert kept == [2, 5]  # the newest (keep_checkpoints=1) and the best
    assert result.best_checkpoint.name == "step-2"
    assert validation.best_lora(run.dir) == run.dir.checkpoints / "step-2" / run.dir.lora_file.name
    out = capsys.readouterr().out
    assert "best checkpoint by validation loss: step-2" in out and "above its best (0.3000 at step 2)" in out


def test_rising_hint_only_after_several_evaluations_above_the_best():
    assert rising([(1, 0.5), (2, 0.4), (3, 0.3)]) is None
    assert rising([(1, 0.5), (2, 0.3), (3, 0.35), (4, 0.32)]) is None
    assert rising([(1, 0.5), (2, 0.3), (3, 0.35), (4, 0.2), (5, 0.4), (6, 0.5)]) is None  # a new best at 4
    assert "above its best" in rising([(1, 0.5), (2, 0.3), (3, 0.35), (4, 0.4), (5, 0.45)])


def test_with_no_held_out_images_a_fixed_training_subset_is_measured(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory, train={"validation_samples": 0})
    val = Validation(run, table=None, latent=None)
    again = Validation(run, table=None, latent=None)
    assert val.train_ids is None and "TRAINING images" in val.note
    assert len(val.data) == 4 and [i["id"] for i in val.data.items] == [i["id"] for i in again.data.items]
