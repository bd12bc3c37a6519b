"""fluxnb.flow (the flow-matching math) and fluxnb.train.step.training_step against the reference script's step."""

from types import SimpleNamespace

import pytest
import torch
from reference_step import reference_loss

from fluxnb.config import TrainConfig
from fluxnb.train import flow
from fluxnb.train.step import LatentScale, training_step


def test_add_noise_interpolates_from_data_to_noise():
    x, eps = torch.randn(3, 16, 4, 6), torch.randn(3, 16, 4, 6)
    sig = torch.tensor([0.0, 0.25, 1.0])
    noisy = flow.add_noise(x, eps, sig)
    torch.testing.assert_close(noisy[0], x[0])  # sigma 0: the clean latent
    torch.testing.assert_close(noisy[1], 0.75 * x[1] + 0.25 * eps[1])
    torch.testing.assert_close(noisy[2], eps[2])  # sigma 1: pure noise
    # the target is the velocity d(noisy)/d(sigma)
    torch.testing.assert_close(flow.flow_matching_target(x, eps), eps - x)


def test_loss_is_weighted_per_example_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 3
    assert flow.flow_matching_loss(pred, target).item() == pytest.approx((1 + 9) / 2)
    w = torch.tensor([2.0, 0.0]).view(2, 1, 1, 1)
    assert flow.flow_matching_loss(pred, target, w).item() == pytest.approx(2 * 1 / 2)
    cos = flow.loss_weighting("cosmap", torch.tensor([0.5]))
    assert cos.shape == (1, 1, 1, 1) and cos.item() == pytest.approx(2 / (torch.pi * 0.5))


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap"])
def test_timesteps_come_from_the_scheduler_table(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = flow.NoiseTable.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    t, s = flow.sample_timesteps(table, 4000, scheme, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) <= set(table.timesteps.tolist())
    torch.testing.assert_close(s, t / 1000)  # unshifted training sigmas
    if scheme == "logit_normal":  # sigmoid(N(0, 1)) piles up in the middle
        assert ((s > 0.25) & (s < 0.75)).float().mean() > 0.6
    elif scheme == "mode":  # mode_scale 1.29 favours the middle too
        assert ((s > 0.25) & (s < 0.75)).float().mean() > 0.55
    else:  # uniform
        assert ((s > 0.25) & (s < 0.75)).float().mean() == pytest.approx(0.5, abs=0.04)


@pytest.fixture(scope="module")
def tiny_inputs(tiny_assets):
    """Two 64x96 images of the tiny dataset through its VAE, their captions through its text encoders."""
    import json

    import numpy as np
    from diffusers import FluxPipeline
    from PIL import Image

    pipe = FluxPipeline.from_pretrained(tiny_assets.model, dtype=torch.float32)
    rows = [json.loads(line) for line in (tiny_assets.dataset / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if Image.open(tiny_assets.dataset / r["file_name"]).size == (64, 96)][:2]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(tiny_assets.dataset / r["file_name"]).convert("RGB"),
                                                      dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for r in rows])
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist  # mean, std: (2, 16, 12, 8)
        embeds, pooled, text_ids = pipe.encode_prompt([r["text"] for r in rows], prompt_2=None, max_sequence_length=77)
    # The batch-of-2 encode leaves mean/std as strided views of one tensor, and torch.randn_like on such a
    # layout draws its numbers in another order (the reference's batch of 1 never has this). fluxnb's cache holds
    # each sample's mean/std as its own contiguous tensor; give the reference the same (same values).
    dist.mean, dist.std = dist.mean.contiguous(), dist.std.contiguous()
    batch = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}
    return pipe, dist, batch


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap"])
def test_training_step_matches_the_reference_script(tiny_inputs, scheme):
    pipe, dist, batch = tiny_inputs
    cfg = TrainConfig(weighting_scheme=scheme, guidance_scale=1.0, mode_scale=1.29)
    args = SimpleNamespace(weighting_scheme=scheme, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                           mode_scale=cfg.mode_scale, guidance_scale=cfg.guidance_scale)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)  # fresh: no set_timesteps yet

    torch.manual_seed(7)  # the script draws from torch's global RNG ...
    expected = reference_loss(pipe.transformer, scheduler, dist, batch, args, pipe.vae.config)
    ours_batch = {**batch, "latent_mean": dist.mean, "latent_std": dist.std}
    table = flow.NoiseTable.from_scheduler(scheduler)
    latent = LatentScale.from_vae_config(pipe.vae.config)
    got = training_step(pipe.transformer, ours_batch, table, cfg, latent,  # ... fluxnb from its own generator
                        torch.Generator().manual_seed(7), torch.float32)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # and a different seed gives a different loss: the comparison above is not vacuous
    other = training_step(pipe.transformer, ours_batch, table, cfg, latent, torch.Generator().manual_seed(8),
                          torch.float32)
    assert other.item() != pytest.approx(expected.item(), rel=1e-4)
