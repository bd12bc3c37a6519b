"""Rectified-flow (flow-matching) training math for FLUX, as pure tensor functions: no models, no I/O.

One training example, in symbols (x = clean latent, eps = Gaussian noise, sigma in (0, 1]):

    x_sigma = (1 - sigma) * x + sigma * eps        # a point on the straight line from data to noise
    target  = eps - x                              # the velocity along that line, d x_sigma / d sigma
    loss    = mean( w(sigma) * (v_theta(x_sigma, sigma) - target)^2 )

sigma is not drawn uniformly in (0, 1): the scheduler's own table of 1000 training timesteps is indexed by
u ~ density(weighting_scheme), exactly as diffusers' FLUX training scripts do (SD3 paper, arXiv 2403.03206):
"none"/"cosmap" draw u uniformly, "logit_normal" draws sigmoid(N(mean, std)), "mode" skews u by `mode_scale`;
"cosmap" instead re-weights the loss. The library functions for both parts are used as they are.
"flux_shift" is kohya's sd-scripts' instead: sigma is continuous, not from the table, and larger images are pushed
towards noise as FLUX.1's sampler shifts them at inference (`flux_shift_sigmas`).
Every random draw takes an explicit `generator`, so a run (and a resumed run) is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)


@dataclass(frozen=True)
class NoiseTable:
    """The scheduler's training table: timesteps (T,) in [1, 1000] and their sigmas (T,) = timesteps / 1000.

    Taken from a FlowMatchEulerDiscreteScheduler *before* any `set_timesteps` call (that call rewrites both
    tables for inference). FLUX.1-dev's scheduler uses dynamic shifting, so its training sigmas are unshifted.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseTable:
        return cls(scheduler.timesteps.detach().clone().float(), scheduler.sigmas.detach().clone().float())

    @property
    def num_train_timesteps(self) -> int:
        return len(self.timesteps)


def scale_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latent -> the unit-variance space the transformer was trained in: (z - shift) * scale."""
    return (latents - shift_factor) * scaling_factor


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from the cached VAE posterior N(mean, std^2), like `DiagonalGaussianDistribution.sample()`.

    Drawing afresh every step (instead of caching one sample) is what the reference does with its cache.
    """
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)  # on the generator's (CPU) device
    return mean + std * eps.to(mean.device)


def sample_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """eps ~ N(0, I) with the shape, dtype and device of `like`, drawn from `generator` (on the CPU)."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def flux_shift_sigmas(batch_size: int, image_tokens: int, sigmoid_scale: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """sd-scripts' "flux_shift" (library/flux_train_utils.py, get_noisy_model_input_and_timesteps): sigmas (B,)

        u     = sigmoid(sigmoid_scale * N(0, 1))
        sigma = e^mu / (e^mu + 1/u - 1)      # time_shift(mu, 1, u): u pushed towards 1 (noise) as mu grows

    with mu FLUX.1's resolution shift for the image's tokens, (h/2)(w/2) of its latent: 0.5 at 256 tokens, 1.15
    at 4096, linear between (diffusers' calculate_shift, FLUX.1's scheduler config), the shift its sampler uses.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = (torch.randn(batch_size, generator=generator) * sigmoid_scale).sigmoid()
    mu = calculate_shift(image_tokens)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def sample_timesteps(table: NoiseTable, batch_size: int, weighting_scheme: str = "none", *, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, sigmoid_scale: float = 1.0,
                     image_tokens: int | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (timesteps, sigmas), each (B,), from the scheduler's table by the weighting scheme's density; for
    "flux_shift", sigmas from `flux_shift_sigmas` for images of `image_tokens` tokens, and timesteps 1000 sigma."""
    if weighting_scheme == "flux_shift":
        sigmas = flux_shift_sigmas(batch_size, image_tokens, sigmoid_scale, generator)
        return sigmas * table.num_train_timesteps, sigmas
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=batch_size, logit_mean=logit_mean, logit_std=logit_std,
        mode_scale=mode_scale, generator=generator)  # (B,) in [0, 1]
    # u == 1 (possible with "mode" when rand() returns exactly 0) would index one past the end: clamp it.
    indices = (u * table.num_train_timesteps).long().clamp(0, table.num_train_timesteps - 1)
    # The reference looks each timestep up again to find its sigma; the table's timesteps are distinct, so
    # indexing the sigmas with the same indices is the same lookup.
    return table.timesteps[indices], table.sigmas[indices]


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x + sigma eps, with sigmas (B,) broadcast over the other dims of x (B, C, h, w)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    return (1.0 - sigmas) * x + sigmas * noise


def flow_matching_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer learns to predict: eps - x."""
    return noise - x


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """Per-example loss weight w(sigma), shaped (B, 1, 1, 1) to broadcast: 1 (also for "flux_shift", as sd-scripts),
    or cosmap's 2 / (pi (1 - 2s + 2s^2))."""
    sigmas = sigmas.view(-1, *([1] * (ndim - 1)))
    return compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE, in fp32: the mean over each example's elements, then over the batch. A scalar.

    `mask` (B, 1, h, w) in [0, 1] (data.masked_loss) weighs each latent pixel's squared error, across channels.
    The mean stays over ALL elements, as kohya-ss/sd-scripts' apply_masked_loss does (not divided by the mask's
    sum): a mostly black mask gives a smaller loss and smaller steps, never a few pixels blown up to full weight.
    """
    err = (pred.float() - target.float()) ** 2  # (B, C, h, w)
    if weighting is not None:
        err = weighting.float() * err
    if mask is not None:
        err = mask.float() * err  # (B, 1, h, w) broadcast over the 16 channels
    return err.reshape(err.shape[0], -1).mean(1).mean()
