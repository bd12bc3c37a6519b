"""One training step, one optimizer step, a fixed-noise evaluation, the optimizer.

`training_step` is the reference script's step (tests/reference_step.py transcribes the script and checks that
both give the same loss; FLUX.1-Kontext-dev's, with a control image, is diffusers' Kontext script's step,
tests/reference_kontext_step.py); the math itself is in fluxnb.train.flow, the loop that calls this in
fluxnb.train.loop.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from . import flow
from .batches import TrainingData


@dataclass(frozen=True)
class LatentScale:
    """From the VAE's config: latents are (z - shift) * scale; images are vae_scale_factor (8) x the latent size."""

    shift: float
    scale: float
    vae_scale_factor: int

    @classmethod
    def from_vae_config(cls, config) -> LatentScale:
        return cls(config["shift_factor"], config["scaling_factor"], 2 ** (len(config["block_out_channels"]) - 1))


Generators = torch.Generator | list[torch.Generator]  # one for the whole batch, or one per sample


def _per_sample(generator: Generators, draw, *tensors: torch.Tensor) -> torch.Tensor:
    """draw(*tensors, generator) for the batch from one generator, or sample by sample from each one's own."""
    if isinstance(generator, torch.Generator):
        return draw(*tensors, generator)
    return torch.cat([draw(*(t[i : i + 1] for t in tensors), g) for i, g in enumerate(generator)])


def training_step(transformer, batch: dict[str, torch.Tensor], table: flow.NoiseTable, cfg: TrainConfig,
                  latent: LatentScale, generator: Generators, dtype: torch.dtype) -> torch.Tensor:
    """One micro-batch's flow-matching loss, the reference script's step (tests/reference_step.py checks it).

    With "control_latents" in the batch (FLUX.1-Kontext-dev) the control image's tokens join the target's
    (`with_control`) and the loss covers the target's alone; flux_shift's resolution shift counts the target's
    tokens, as FluxKontextPipeline's sampler does (its mu comes from the noisy latents before the control joins).

    `generator` draws every random number of the step (latent sample, noise, timestep): one generator for the
    batch (as the reference draws from torch's global RNG), or one per sample (the training loop: then each
    sample's draws depend on the sample and the step alone, not on how samples are split into batches or GPUs).
    """
    from accelerate.utils import extract_model_from_parallel
    from diffusers import FluxPipeline

    # A fresh draw from each cached VAE posterior, into the transformer's latent space.
    x = _per_sample(generator, flow.sample_latents, batch["latent_mean"], batch["latent_std"])  # (B, 16, h, w)
    x = flow.scale_latents(x, latent.shift, latent.scale).to(dtype)
    b, c, h, w = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)  # (h/2 * w/2, 3)
    noise = _per_sample(generator, flow.sample_noise, x)  # eps, (B, 16, h, w)
    def timesteps_for(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # (n,), (n,)
        return flow.sample_timesteps(table, n, cfg.weighting_scheme, logit_mean=cfg.logit_mean,
                                     logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                     sigmoid_scale=cfg.sigmoid_scale, image_tokens=(h // 2) * (w // 2), generator=g)

    if isinstance(generator, torch.Generator):
        timesteps, sigmas = timesteps_for(b, generator)
    else:
        drawn = [timesteps_for(1, g) for g in generator]
        timesteps, sigmas = torch.cat([t for t, _ in drawn]), torch.cat([s for _, s in drawn])
    noisy = flow.add_noise(x, noise, sigmas)  # (1 - sigma) x + sigma eps
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # 2x2 patches -> tokens: (B, h/2 * w/2, 64)
    control = "control_latents" in batch  # FLUX.1-Kontext-dev: the pair's input image rides along
    if control:
        packed, img_ids = with_control(packed, img_ids, batch["control_latents"], latent, dtype)  # (B, N + N', 64)
    # FLUX.1-dev is guidance-distilled: it takes the guidance scale as an input embedding (1.0 while training).
    config = extract_model_from_parallel(transformer).config  # under DistributedDataParallel too
    guidance = torch.full((b,), cfg.guidance_scale, device=x.device) if config.guidance_embeds else None
    pred = transformer(hidden_states=packed, timestep=(timesteps / 1000).to(x.device), guidance=guidance,
                       pooled_projections=batch["pooled_prompt_embeds"], encoder_hidden_states=batch["prompt_embeds"],
                       txt_ids=batch["text_ids"], img_ids=img_ids, return_dict=False)[0]  # (B, h/2 * w/2, 64)
    if control:
        pred = pred[:, : (h // 2) * (w // 2)]  # the target's tokens: nothing is learnt about the control's
    f = latent.vae_scale_factor
    pred = FluxPipeline._unpack_latents(pred, h * f, w * f, f)  # (B, 16, h, w)
    target = flow.flow_matching_target(x, noise)  # eps - x
    weighting = flow.loss_weighting(cfg.weighting_scheme, sigmas.to(x.device))  # (B, 1, 1, 1)
    return flow.flow_matching_loss(pred, target, weighting, batch.get("loss_mask"))  # mask: data.masked_loss


def with_control(packed: torch.Tensor, img_ids: torch.Tensor, control: torch.Tensor, latent: LatentScale,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext's input: the control image's tokens after the noisy target's, as FluxKontextPipeline.prepare_latents
    lays them out. The control is the cached VAE mean, scaled like the target and never noised; its position ids
    are its own grid's with the first coordinate 1 (the target's is 0), which is how the model tells them apart.
    control: (B, 16, h', w') unscaled, fp32. Returns the tokens (B, N + h'/2 * w'/2, 64) and ids (N + ..., 3)."""
    from diffusers import FluxPipeline

    z = flow.scale_latents(control.to(packed.device), latent.shift, latent.scale).to(dtype)  # (B, 16, h', w')
    b, c, h, w = z.shape
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, packed.device, dtype)  # (h'/2 * w'/2, 3)
    ids[..., 0] = 1
    tokens = FluxPipeline._pack_latents(z, b, c, h, w)  # (B, h'/2 * w'/2, 64)
    return torch.cat([packed, tokens], dim=1), torch.cat([img_ids, ids], dim=0)


@torch.no_grad()
def evaluate(transformer, data: TrainingData, table: flow.NoiseTable, cfg: TrainConfig, latent: LatentScale,
             hw, *, limit: int | None = 16, seed: int = 1234, autocast=contextlib.nullcontext) -> float:
    """Mean loss over (up to `limit`) training samples with FIXED latent draws, noise and timesteps.

    The per-step loss jumps with each random sigma; this number moves only when the model does, so
    "before vs after" is an honest measure of what training changed.
    """
    g = torch.Generator().manual_seed(seed)
    was_training = transformer.training
    transformer.eval()
    losses = []
    with autocast():
        for item in data.items[:limit]:
            batch = data.collate([item], hw.device, hw.dtype)
            losses.append(training_step(transformer, batch, table, cfg, latent, g, hw.dtype).item())
    transformer.train(was_training)
    return sum(losses) / len(losses)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """8-bit AdamW keeps Adam's two moments in 8 bits (blockwise-quantized): 2 bytes / param instead of 8, one
    kernel per LoRA tensor. Plain AdamW on a GPU is torch's fused one: a few kernels for all ~600 LoRA tensors.

    Prodigy (prodigyopt) is Adam that estimates its own step size d from how far the weights moved along the
    gradients; learning_rate multiplies d (1.0 = Prodigy's own). Its settings are diffusers' FLUX scripts': Adam's
    bias correction, and d's estimate kept out of the LR warm-up. It keeps 4 fp32 numbers per LoRA weight."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" when made
            return Prodigy(params, use_bias_correction=True, safeguard_warmup=True, **kwargs)
    return torch.optim.AdamW(params, fused=bool(params) and all(p.is_cuda for p in params), **kwargs)


def optimizer_note(cfg: TrainConfig) -> str:
    """A warning when learning_rate does not fit the optimizer (Prodigy's is a multiplier, Adam's a step size), else
    "". The form shows it as the values change; training prints it."""
    lr = cfg.learning_rate
    if cfg.optimizer == "prodigy" and lr < 0.1:
        return (f"with prodigy, learning_rate multiplies the step size Prodigy finds itself: 1.0 is typical, and "
                f"{lr:g} makes every step {1 / lr:.0f}x smaller than its estimate; set learning_rate to 1.0.")
    if cfg.optimizer != "prodigy" and lr >= 0.1:
        return (f"learning_rate={lr:g} is {cfg.optimizer}'s step size: LoRA training uses about 1e-4, and {lr:g} "
                "would diverge; set 1e-4, or optimizer 'prodigy' (whose learning_rate is a multiplier, 1.0 typical).")
    return ""


MAX_SKIPPED_FP16_STEPS = 20  # the fp16 loss scaler skips a step on inf gradients; this many in a row is divergence


class Diverged(FloatingPointError):
    """The loss or the gradient norm of a step stopped being a finite number (the loop says what to do)."""


def optimizer_step(accelerator, wrapped, state, data: TrainingData, latent: LatentScale, table: flow.NoiseTable,
                   cfg: TrainConfig, hw) -> tuple[float, float]:
    """One optimizer step: this process's micro-batches of step `state.step`, forward + backward each, gradients
    all-reduced across processes, clipped, applied. Returns (mean loss of the step's samples over all processes,
    gradient norm); raises Diverged on a non-finite loss or gradient norm."""
    total, grad_norm = torch.zeros(2, device=accelerator.device), float("nan")
    for micro in data.micro_batches(state.step, accelerator.process_index, hw.device, hw.dtype):
        with accelerator.accumulate(wrapped):  # no all-reduce until the last micro-batch of the step
            loss = training_step(wrapped, micro.batch, table, cfg, latent, micro.generators, hw.dtype)
            value = loss.item()
            if not bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):  # on any process
                raise Diverged(f"the loss became {value if not math.isfinite(value) else 'non-finite on another process'}")
            accelerator.backward(micro.scale * loss)  # every sample of the step weighs the same (MicroBatch)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(state.params, cfg.max_grad_norm).item()
                state.skipped = state.skipped + 1 if not math.isfinite(grad_norm) else 0  # fp16: the scaler skips
                if state.skipped and (state.scaler is None or state.skipped > MAX_SKIPPED_FP16_STEPS):
                    raise Diverged(f"the gradient norm became {grad_norm}")
            state.optimizer.step()  # a no-op before the last micro-batch (accelerate)
            if accelerator.sync_gradients and not state.optimizer.step_was_skipped:
                state.schedule.step()  # once per optimizer step, whatever the number of processes
                state.update_ema()  # the average of the LoRA weights (train.ema_decay > 0), from the weights just moved
            state.optimizer.zero_grad(set_to_none=True)
        samples = len(micro.ids) if micro.scale else 0
        total += torch.stack([loss.detach().float() * samples, torch.tensor(float(samples), device=total.device)])
    total = accelerator.reduce(total, "sum")  # (sum of per-sample losses, samples) over every process
    state.step += 1
    return (total[0] / total[1]).item(), grad_norm
