"""Does my LoRA do anything, and did it learn the style? Two measurements on the validation prompts.

    effect = lora_effect(base, styled)          # base vs LoRA images (same seeds): how much the LoRA changes them
    proof = style_proof(pipe, run, settings)    # does it pull generated images toward the training images?

`lora_effect` is the pixel difference of `sampling.base_vs_lora`'s two columns, with a warning when it is too
small to see (a LoRA that "does nothing": too few steps, a learning rate too low, a scale of 0, the wrong file).

`style_proof` measures the style in the VAE's latent space, where FLUX works: each of the 16 latent channels'
mean and spread over all positions of the generated images, against the same statistics of the training images'
cached latents. A LoRA that learnt the training set's look brings the distance down from the base model's; the
same measurement with the adapter at scale 0 must not move (the negative control). Latent statistics rather than
pixels: on the tiny profile the VAE is random, so its pixels say little, but its latents are what was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..data import latents as latent_cache
from ..data.store import read_samples
from ..run import Run
from .sampling import ADAPTER, SampleSettings, generate, set_scale

NEGLIGIBLE = 1.0  # mean absolute pixel difference (0-255) below which a LoRA's effect is not visible
MIN_MOVE = 0.10  # the share of the base model's distance a LoRA must remove to count as having learnt the style


@dataclass
class Effect:
    per_prompt: list[float]  # mean |LoRA - base| per prompt, in pixel levels (0-255)
    prompts: list[str]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_prompt))

    @property
    def negligible(self) -> bool:
        return self.mean < NEGLIGIBLE

    def __str__(self) -> str:
        lines = [f"LoRA vs base, same seeds: mean pixel change {self.mean:.2f} of 255"]
        lines += [f"  {d:6.2f}  {p}" for d, p in zip(self.per_prompt, self.prompts)]
        if self.negligible:
            lines.append(f"WARNING: the LoRA barely changes the images (under {NEGLIGIBLE} of 255): check the scale "
                         "(0 is the base model), that the right LoRA file is loaded, and train longer or with a "
                         "higher learning rate.")
        return "\n".join(lines)


def lora_effect(base: list, styled: list, prompts: list[str]) -> Effect:
    """The per-prompt mean absolute difference between base and LoRA images (PIL or arrays of one size)."""
    diff = [float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()) for a, b in zip(base, styled)]
    return Effect(diff, list(prompts))


def channel_stats(latents: list[torch.Tensor]) -> torch.Tensor:
    """(32,): each channel's mean, then its standard deviation, over every position of every latent (16, h, w).
    On the CPU, whichever device the latents come from: generated ones are on the GPU, cached ones are not."""
    flat = torch.cat([z.detach().to("cpu", torch.float32).flatten(1) for z in latents], dim=1)  # (16, sum of h * w)
    return torch.cat([flat.mean(1), flat.std(1)])


def training_stats(run: Run, vae_config) -> torch.Tensor:
    """channel_stats of the training images: their cached VAE means, shifted and scaled as training sees them."""
    means = [latent_cache.load_latent(run.dir, s.id)[0] for s in read_samples(run.dir)]
    return channel_stats([(m - vae_config.shift_factor) * vae_config.scaling_factor for m in means])


def generated_stats(pipe, run: Run, prompts: list[str], settings: SampleSettings) -> torch.Tensor:
    """channel_stats of the latents the pipeline generates for `prompts` (before the VAE decodes them)."""
    packed = generate(pipe, prompts, settings, run, output_type="latent")  # each (h/2 * w/2, 64)
    f = pipe.vae_scale_factor
    return channel_stats([pipe._unpack_latents(p[None], settings.height, settings.width, f)[0] for p in packed])


@dataclass
class StyleProof:
    base: float  # distance of the base model's images to the training images (channel statistics, L2)
    lora: float  # the same with the LoRA at `scale`
    scale: float

    @property
    def moved(self) -> float:
        """The share of the base model's distance the LoRA removed (0 = none, 1 = all; < 0 = further away)."""
        return 1.0 - self.lora / self.base

    @property
    def learned(self) -> bool:
        return self.moved >= MIN_MOVE

    def __str__(self) -> str:
        verdict = "the style was learnt" if self.learned else f"NOT learnt (under {MIN_MOVE:.0%})"
        return (f"distance to the training images (latent channel statistics): base {self.base:.3f} -> LoRA at "
                f"scale {self.scale:g} {self.lora:.3f} ({self.moved:+.0%}): {verdict}")


def style_proof(pipe, run: Run, settings: SampleSettings, *, prompts: list[str] | None = None,
                scale: float = 1.0, name: str = ADAPTER) -> StyleProof:
    """Base vs LoRA distance to the training images, same prompts and seeds; leaves the adapter at scale 1."""
    prompts = prompts or run.config.data.validation_prompts
    target = training_stats(run, pipe.vae.config)
    settings = dataclasses.replace(settings, lora_scale=scale)
    pipe.disable_lora()
    base = float((generated_stats(pipe, run, prompts, settings) - target).norm())
    pipe.enable_lora()
    set_scale(pipe, scale, name)
    lora = float((generated_stats(pipe, run, prompts, settings) - target).norm())
    set_scale(pipe, 1.0, name)
    return StyleProof(base, lora, scale)
