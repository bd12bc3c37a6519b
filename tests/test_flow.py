"""fluxnb.flow (the flow-matching math) and fluxnb.train.step.training_step against the reference script's step."""

import math
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


def _sd_scripts_flux_shift(bsz: int, h: int, w: int, sigmoid_scale: float, num_timesteps: int = 1000):
    """kohya-ss/sd-scripts, library/flux_train_utils.py (48d368f), get_noisy_model_input_and_timesteps with
    timestep_sampling="flux_shift", transcribed with its helpers time_shift and get_lin_function. h, w: the
    latent's sides before packing; draws from torch's global RNG, as the script does."""
    def time_shift(mu, sigma, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    def get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
        m = (y2 - y1) / (x2 - x1)
        b = y1 - m * x1
        return lambda x: m * x + b

    sigmas = torch.randn(bsz)
    sigmas = sigmas * sigmoid_scale
    sigmas = sigmas.sigmoid()
    mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
    sigmas = time_shift(mu, 1.0, sigmas)
    return sigmas * num_timesteps, sigmas


@pytest.mark.parametrize("width, height", [(64, 96), (512, 512), (512, 768), (1024, 1024), (1536, 640)])
@pytest.mark.parametrize("sigmoid_scale", [1.0, 2.5])
def test_flux_shift_draws_what_sd_scripts_draws(width, height, sigmoid_scale):
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = flow.NoiseTable.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    h, w = height // 8, width // 8  # the VAE's latent
    torch.manual_seed(11)
    expected_t, expected_s = _sd_scripts_flux_shift(512, h, w, sigmoid_scale)
    t, s = flow.sample_timesteps(table, 512, "flux_shift", sigmoid_scale=sigmoid_scale, image_tokens=(h // 2) * (w // 2),
                                 generator=torch.Generator().manual_seed(11))
    assert torch.equal(s, expected_s) and torch.equal(t, expected_t)
    assert flow.loss_weighting("flux_shift", s).eq(1).all()  # sd-scripts weighs flux_shift's losses alike


def test_flux_shift_moves_bigger_images_towards_noise():
    """The shift grows with the tokens: at 256 (256x256 pixels) mu = 0.5, at 4096 (1024x1024) mu = 1.15."""
    medians = [flow.flux_shift_sigmas(20000, tokens, generator=torch.Generator().manual_seed(0)).median().item()
               for tokens in (256, 1536, 4096)]
    # sigmoid(N(0, 1)) has median 0.5; shifted: e^mu / (e^mu + 1) there
    assert medians == pytest.approx([math.exp(mu) / (math.exp(mu) + 1) for mu in (0.5, 0.5 + 0.65 * 1280 / 3840,
                                                                                  1.15)], abs=0.01)


class _Spy(torch.nn.Module):
    """The transformer, recording the timesteps the training step feeds it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.timesteps = inner, inner.config, []

    def forward(self, **kwargs):
        self.timesteps.append(kwargs["timestep"])
        return self.inner(**kwargs)


def test_training_step_with_flux_shift_feeds_the_shifted_sigma_of_the_images_size(tiny_inputs):
    """Only the timesteps change: the latent draw and the noise come from the same generator first, as before."""
    pipe, dist, batch = tiny_inputs
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    table, latent = flow.NoiseTable.from_scheduler(scheduler), LatentScale.from_vae_config(pipe.vae.config)
    ours = {**batch, "latent_mean": dist.mean, "latent_std": dist.std}
    spy = _Spy(pipe.transformer)
    cfg = TrainConfig(weighting_scheme="flux_shift", sigmoid_scale=1.5)
    assert torch.isfinite(training_step(spy, ours, table, cfg, latent, torch.Generator().manual_seed(5), torch.float32))
    g = torch.Generator().manual_seed(5)
    x = flow.sample_latents(dist.mean, dist.std, g)
    flow.sample_noise(x, g)
    h, w = x.shape[-2:]  # (12, 8): 6 x 4 = 24 tokens
    torch.testing.assert_close(spy.timesteps[0], flow.flux_shift_sigmas(2, (h // 2) * (w // 2), 1.5, g))
