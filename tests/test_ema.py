"""train.ema_decay: an EMA of the LoRA weights (diffusers' EMAModel), off by default.

When on, it follows the weights after every optimizer step, is what the run shows and saves (sample grids, the
checkpoints' LoRA files, the final LoRA), and resumes exactly: a stopped run ends with the same average and the
same trained weights as an uninterrupted one. When off, checkpoints hold what they always held."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_run

from fluxnb.config import ConfigError, TrainConfig
from fluxnb.train import budget, checkpoint, train
from fluxnb.train.monitor import ValidationSampler

SETTINGS = dict(train={"max_train_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2,
                       "lr_scheduler": "cosine", "lr_warmup_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 9,
                       "sample_every": 3, "validate_every": 2, "ema_decay": 0.8},
                lora={"dropout": 0.1, "rank": 4, "alpha": 4.0})


def _as_list(path, reference: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A LoRA file's tensors in the order of the trained parameters (peft's names, adapter name dropped)."""
    weights = load_file(path)
    return [weights[f"transformer.{name}"] for name in reference]


def _names(run) -> dict[str, None]:
    from fluxnb.train import load_for_training

    model = load_for_training(run)
    return {n.replace(".default", ""): None for n, p in model.named_parameters() if p.requires_grad}


def _expected_ema(raw: list[list[torch.Tensor]], decay: float) -> list[list[torch.Tensor]]:
    """diffusers' EMAModel by hand: e_0 = the initial weights; at update n, d_n = min(decay, (1 + k) / (10 + k))
    with k = n - 1 (d_1 = 0: the first update copies), e_n = e_(n-1) - (1 - d_n) (e_(n-1) - w_n)."""
    ema, out = [w.clone() for w in raw[0]], []
    for n, weights in enumerate(raw[1:], start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        ema = [e - (1 - d) * (e - w) for e, w in zip(ema, weights)]
        out.append(ema)
    return out


def test_ema_is_off_by_default_and_checked():
    assert TrainConfig().ema_decay == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"ema_decay must be a number in \[0, 1\)"):
            TrainConfig(ema_decay=bad)


def test_ema_follows_the_weights_and_is_what_the_run_saves_and_shows(tmp_path, tmp_path_factory, monkeypatch):
    run = make_run(tmp_path / "run", tmp_path_factory, **SETTINGS)
    names = _names(run)
    grids = {}
    real_grid = ValidationSampler.grid

    def grid(self, transformer, step, live):  # the weights each sample grid is drawn with
        grids[step] = [p.detach().clone() for p in transformer.parameters() if p.requires_grad]
        return real_grid(self, transformer, step, live)

    monkeypatch.setattr(ValidationSampler, "grid", grid)
    result = train(run, live=False)
    ckpts = checkpoint.list_checkpoints(run.dir)
    assert [c.step for c in ckpts] == [1, 2, 3, 4, 5, 6]
    raw = [grids[0]] + [c.training_state()["lora"] for c in ckpts]  # step 0: nothing trained, EMA = weights
    want = _expected_ema(raw, 0.8)
    for c, expected in zip(ckpts, want):
        saved = _as_list(c.path / "pytorch_lora_weights.safetensors", names)
        assert all(torch.allclose(s, e, rtol=0, atol=1e-7) for s, e in zip(saved, expected)), c.step
        assert c.training_state()["ema"]["optimization_step"] == c.step
    assert not all(torch.equal(a, b) for a, b in zip(raw[-1], want[-1]))  # the average is not the weights
    final = _as_list(result.lora, names)
    assert all(torch.equal(a, b) for a, b in zip(final, _as_list(ckpts[-1].path / result.lora.name, names)))
    for step in (3, 6):  # sample grids: the average at that step, and training went on with the weights
        assert all(torch.allclose(g, e, rtol=0, atol=1e-7) for g, e in zip(grids[step], want[step - 1]))
    meta = json.loads((run.dir.root / "config.json").read_text())
    assert meta["train"]["ema_decay"] == 0.8


def test_a_stopped_run_with_ema_resumes_to_the_same_average_and_weights(tmp_path, tmp_path_factory):
    settings = {"train": {**SETTINGS["train"], "checkpoint_every": 2, "keep_checkpoints": 2}, "lora": SETTINGS["lora"]}
    whole = make_run(tmp_path / "whole", tmp_path_factory, **settings)
    train(whole, live=False)
    parts = make_run(tmp_path / "parts", tmp_path_factory, **settings)
    assert train(parts, stop_after=3, live=False).step == 3
    checkpoint.latest(parts.dir).path.rename(parts.dir.checkpoints / "step-3.lost")  # resume from step 2
    train(parts, resume=True, live=False)
    a, b = load_file(whole.dir.lora_file), load_file(parts.dir.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed average differs"
    sa, sb = checkpoint.latest(whole.dir).training_state(), checkpoint.latest(parts.dir).training_state()
    assert all(torch.equal(x, y) for x, y in zip(sa["lora"], sb["lora"], strict=True))  # the weights trained
    assert all(torch.equal(x, y) for x, y in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"], strict=True))
    assert sa["ema"]["optimization_step"] == sb["ema"]["optimization_step"] == 6


def test_without_ema_checkpoints_are_as_before_and_ema_can_start_on_resume(tmp_path, tmp_path_factory, capsys):
    settings = dict(train={"max_train_steps": 2, "checkpoint_every": 1, "sample_every": 0, "validate_every": 0})
    run = make_run(tmp_path / "run", tmp_path_factory, **settings)
    train(run, stop_after=1, live=False)
    state = checkpoint.latest(run.dir).training_state()
    assert set(state) == {"optimizer", "lr_scheduler", "scaler", "rng", "step"}  # no "ema", no "lora"
    run.config = run.config.replace(train={"ema_decay": 0.9})  # switched on for the rest of the run
    train(run, resume=True, live=False)
    assert "average (decay 0.9) starts at step 1" in capsys.readouterr().out
    last = checkpoint.latest(run.dir).training_state()
    assert last["ema"]["optimization_step"] == 1 and last["ema"]["decay"] == 0.9


def test_the_planner_keeps_a_small_ema_on_the_gpu_and_a_large_one_in_cpu_ram():
    from fluxnb.config import LoRAConfig

    plain, ema = budget.choose(6.0), budget.choose(6.0, ema=True)
    size = 4 * plain.lora_params / budget.GiB  # the blog's rank 4: 18.7 MB
    assert budget.ema_on_gpu(plain.lora_params, 6.0) and ema.layout.extra_gib == pytest.approx(size)
    same = budget.Layout(plain.layout.batch, plain.layout.streamed, plain.layout.kept, extra_gib=size)
    assert same.peak_gib(plain.tokens) == pytest.approx(plain.estimate_gib + size)  # counted at the peak
    assert "EMA" in ema.table() and "EMA" not in plain.table()
    big = LoRAConfig(rank=64, targets="all-linear")  # 1.3 GiB in fp32: in CPU RAM, nothing on the GPU
    on_cpu = budget.choose(23.6, lora=big, ema=True)
    assert on_cpu.layout.extra_gib == 0.0 and "in CPU RAM" in on_cpu.table()
