"""Issue 28's training options, each off by default: caption dropout, Prodigy, and how they reach the CLI and a
resumed run. (flux_shift is in test_flow.py, the base model in test_config.py and test_hub.py.)"""

import json

import pytest
import torch
from accelerate import Accelerator
from train_helpers import make_run

from fluxnb.base.errors import FluxnbError
from fluxnb.config import TrainConfig
from fluxnb.data import embeddings
from fluxnb.train import TrainState, checkpoint, load_for_training, train
from fluxnb.train.batches import TrainingData
from fluxnb.train.step import make_optimizer, optimizer_note

CPU = torch.device("cpu")


def _draws(micro) -> torch.Tensor:
    return torch.stack([torch.randn(4, generator=g) for g in micro.generators])


def test_caption_dropout_swaps_only_the_text_for_the_empty_prompts(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory)
    plain = TrainingData(run.dir, 2, seed=3, accumulation=2)
    off = TrainingData(run.dir, 2, seed=3, accumulation=2, caption_dropout=0.0)
    on = TrainingData(run.dir, 2, seed=3, accumulation=2, caption_dropout=0.5)
    empty = embeddings.load_embedding(run.dir, "")
    items = {item["id"]: item for item in plain.items}
    dropped = total = 0
    for step in range(24):
        for a, b, c in zip(*(d.micro_batches(step, 0, CPU, torch.float32) for d in (plain, off, on))):
            # Off: the very batch of before, from the very items, with the same generators.
            draws = [_draws(m) for m in (a, b, c)]  # each generator's first numbers (noise, timestep, latent draw)
            assert a.ids == b.ids == c.ids and torch.equal(draws[0], draws[1])
            own = TrainingData.collate([items[i] for i in a.ids], CPU, torch.float32)
            assert all(torch.equal(a.batch[k], own[k]) and torch.equal(b.batch[k], own[k]) for k in own)
            # On: the same latents and draws (noise, timesteps); a sample's text is its own or the empty prompt's.
            assert torch.equal(c.batch["latent_mean"], own["latent_mean"]) and torch.equal(draws[2], draws[0])
            for i in range(len(c.ids)):
                is_empty = torch.equal(c.batch["prompt_embeds"][i], empty["prompt_embeds"])
                assert is_empty or torch.equal(c.batch["prompt_embeds"][i], own["prompt_embeds"][i])
                if is_empty:
                    assert torch.equal(c.batch["pooled_prompt_embeds"][i], empty["pooled_prompt_embeds"])
                dropped, total = dropped + is_empty, total + 1
    assert total > 60 and 0.35 < dropped / total < 0.65, (dropped, total)  # p = 0.5 (measured: 42 of 76)
    # A pure function of (seed, step, sample): a resumed run, or a fresh TrainingData, drops the same ones.
    again = TrainingData(run.dir, 2, seed=3, accumulation=2, caption_dropout=0.5)
    for step in (0, 7, 23):
        for c, d in zip(on.micro_batches(step, 0, CPU, torch.float32), again.micro_batches(step, 0, CPU, torch.float32)):
            assert torch.equal(c.batch["prompt_embeds"], d.batch["prompt_embeds"])


def test_caption_dropout_without_the_empty_prompts_embedding_says_to_run_notebook_01(tmp_path, tmp_path_factory):
    """A run embedded before notebook 01 cached the empty prompt: one line, before anything is loaded or written."""
    run = make_run(tmp_path / "run", tmp_path_factory, train={"caption_dropout": 0.1, "sample_every": 0})
    embeddings.embedding_path(run.dir, "").unlink()
    with pytest.raises(FluxnbError, match=r"caption_dropout=0.1 trains on the empty prompt.*fluxnb embed") as err:
        train(run, live=False)
    assert len(str(err.value).splitlines()) == 1 and not run.dir.checkpoints.exists()
    run.config = run.config.replace(train={"caption_dropout": 0.0})  # off: the missing file does not matter
    assert train(run, max_steps=1, live=False).step == 1


def test_prodigy_is_adam_with_its_own_step_size_and_its_state_round_trips(tmp_path, tmp_path_factory):
    from prodigyopt import Prodigy

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.zeros(4, 8))]  # LoRA A, B
    target = torch.randn(8, 8)
    opt = make_optimizer(weights, TrainConfig(optimizer="prodigy", learning_rate=1.0))
    group = opt.param_groups[0]
    assert isinstance(opt, Prodigy) and (group["lr"], group["use_bias_correction"], group["safeguard_warmup"]) == (
        1.0, True, True)
    assert isinstance(make_optimizer(weights, TrainConfig()), __import__("bitsandbytes").optim.AdamW8bit)  # default
    for _ in range(30):
        (weights[0] @ weights[1] - target).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.param_groups[0]["d"] > 5e-6  # it grew its step size d from d0 = 1e-6 (measured: 7.6e-6 here)

    # Through TrainState: what a checkpoint holds puts a fresh optimizer exactly where this one is.
    run = make_run(tmp_path / "run", tmp_path_factory, train={"optimizer": "prodigy", "learning_rate": 1.0})
    model = load_for_training(run)
    state = TrainState.create(model, run.config.train, Accelerator(cpu=True))
    params = state.params
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
    saved = state.state_dict()
    fresh = TrainState.create(model, run.config.train, Accelerator(cpu=True))
    fresh.load_state_dict(saved)
    a, b = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert [{k: v for k, v in g.items() if k != "params"} for g in a["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in b["param_groups"]]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i]
               if torch.is_tensor(a["state"][i][k]))


def test_the_learning_rate_note_says_when_it_does_not_fit_the_optimizer():
    assert optimizer_note(TrainConfig()) == "" and optimizer_note(TrainConfig(optimizer="prodigy", learning_rate=1.0)) == ""
    assert "10000x smaller" in optimizer_note(TrainConfig(optimizer="prodigy", learning_rate=1e-4))
    assert "would diverge" in optimizer_note(TrainConfig(optimizer="adamw", learning_rate=1.0))


def test_resuming_with_another_optimizer_is_refused(tmp_path, tmp_path_factory):
    """A checkpoint's optimizer state belongs to its optimizer: 8-bit AdamW's quantized moments are no AdamW state
    and no Prodigy state. One line before anything loads, and nothing changes on disk."""
    run = make_run(tmp_path / "run", tmp_path_factory,
                   train={"max_train_steps": 2, "sample_every": 0, "optimizer": "adamw8bit"})
    train(run, stop_after=1, live=False)
    before = sorted(p.name for p in run.dir.checkpoints.iterdir())
    for other in ("adamw", "prodigy"):
        run.config = run.config.replace(train={"optimizer": other})
        with pytest.raises(FluxnbError, match=rf"optimizer 'adamw8bit'; the config now asks for '{other}'") as err:
            train(run, resume=True, live=False)
        assert len(str(err.value).splitlines()) == 1
    assert sorted(p.name for p in run.dir.checkpoints.iterdir()) == before


def test_cli_takes_the_options_saves_them_once_training_starts_and_keeps_the_preset(tmp_path, tmp_path_factory):
    from fluxnb.cli import _open_step_run, main, parse

    run = make_run(tmp_path / "run", tmp_path_factory, train={"sample_every": 0})
    root = str(run.dir.root)
    assert main(["train", "--run-dir", root, "--max-steps", "1", "--optimizer", "prodigy", "--learning-rate", "1.0",
                 "--caption-dropout", "0.25", "--weighting-scheme", "flux_shift", "--sigmoid-scale", "1.5"]) == 0
    saved = json.loads((run.dir.root / "config.json").read_text())["train"]
    assert (saved["optimizer"], saved["learning_rate"], saved["caption_dropout"], saved["weighting_scheme"],
            saved["sigmoid_scale"], saved["max_train_steps"]) == ("prodigy", 1.0, 0.25, "flux_shift", 1.5, 1)
    assert "d" in checkpoint.latest(run.dir).training_state()["optimizer"]["param_groups"][0]  # Prodigy's state
    # notebook 01's --base: the tiny model's folder stays the model_id, the base is what the card says.
    opened = _open_step_run(parse(["embed", "--run-dir", root, "--base", "FLUX.1-Krea-dev"]))
    assert (opened.config.model.base, opened.config.model.model_id) == ("FLUX.1-Krea-dev", run.config.model.model_id)
