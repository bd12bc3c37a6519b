"""A transcription of ONE training step of the reference script, to check fluxnb's step against it.

Source: huggingface/diffusers, examples/research_projects/flux_lora_quantization/
train_dreambooth_lora_flux_miniature.py, the body of `for step, batch in enumerate(train_dataloader)` and its
`get_sigmas` helper (the `--cache_latents` branch, the one the blog uses). The statements below are the script's,
in its order, with `args.*` / `accelerator.*` turned into arguments and the backward/optimizer lines left out
(the test compares losses).

Two lines had to change, because diffusers changed two private helpers after the script was written; both
changes keep the script's intent and are marked `# ADAPTED`:
  1. `_prepare_latent_image_ids` now takes the PACKED grid (h/2, w/2); it used to halve its arguments itself.
     The script passes the latent h, w, which today would give 4x too many position ids.
  2. `_unpack_latents` now divides `height` by `vae_scale_factor * 2` (it used to divide by `vae_scale_factor`
     and unpack to twice that). The script's `vae_scale_factor = 2 ** len(block_out_channels)` (16 for FLUX)
     matched the old body; with today's body the pipeline's own factor, 2 ** (len - 1) = 8, restores the shape.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


def reference_loss(transformer, noise_scheduler_copy, latent_dist, batch, args: SimpleNamespace, vae_config,
                   weight_dtype=torch.float32, device=torch.device("cpu")) -> torch.Tensor:
    """The script's loss for one batch. Random draws come from torch's global RNG, in the script's order."""

    class accelerator:  # noqa: N801 - the names the script uses
        pass

    accelerator.device = device
    vae_config_shift_factor = vae_config.shift_factor
    vae_config_scaling_factor = vae_config.scaling_factor
    vae_config_block_out_channels = vae_config.block_out_channels

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        timesteps = timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]

        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    # ---- from the loop body ----
    model_input = latent_dist.sample()
    model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
    model_input = model_input.to(dtype=weight_dtype)

    vae_scale_factor = 2 ** (len(vae_config_block_out_channels) - 1)  # ADAPTED (2): was 2 ** len(...)

    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        model_input.shape[0],
        model_input.shape[2] // 2,  # ADAPTED (1): was model_input.shape[2]
        model_input.shape[3] // 2,  # ADAPTED (1): was model_input.shape[3]
        accelerator.device,
        weight_dtype,
    )
    # Sample noise that we'll add to the latents
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]

    # Sample a random timestep for each image
    # for weighting schemes where we sample timesteps non-uniformly
    u = compute_density_for_timestep_sampling(
        weighting_scheme=args.weighting_scheme,
        batch_size=bsz,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)

    # Add noise according to flow matching.
    # zt = (1 - texp) * x + texp * z1
    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise

    packed_noisy_model_input = FluxPipeline._pack_latents(
        noisy_model_input,
        batch_size=model_input.shape[0],
        num_channels_latents=model_input.shape[1],
        height=model_input.shape[2],
        width=model_input.shape[3],
    )

    # handle guidance
    if transformer.config.guidance_embeds:
        guidance = torch.tensor([args.guidance_scale], device=accelerator.device)
        guidance = guidance.expand(model_input.shape[0])
    else:
        guidance = None

    # Predict the noise
    prompt_embeds = batch["prompt_embeds"].to(device=accelerator.device, dtype=weight_dtype)
    pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device=accelerator.device, dtype=weight_dtype)
    text_ids = batch["text_ids"].to(device=accelerator.device, dtype=weight_dtype)
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        # YiYi notes: divide it by 1000 for now because we scale it by 1000 in the transforme rmodel (we should not keep it but I want to keep the inputs same for the model for testing)
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    model_pred = FluxPipeline._unpack_latents(
        model_pred,
        height=int(model_input.shape[2] * vae_scale_factor),  # ADAPTED (2): was * vae_scale_factor / 2
        width=int(model_input.shape[3] * vae_scale_factor),  # ADAPTED (2): was * vae_scale_factor / 2
        vae_scale_factor=vae_scale_factor,
    )

    # these weighting schemes use a uniform timestep sampling
    # and instead post-weight the loss
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)

    # flow matching loss
    target = noise - model_input

    # Compute regular loss.
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
        1,
    )
    loss = loss.mean()
    return loss
