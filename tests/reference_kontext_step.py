"""A transcription of ONE training step of diffusers' FLUX.1-Kontext LoRA script, to check fluxnb's Kontext step.

Source: huggingface/diffusers (01310e78), examples/dreambooth/train_dreambooth_lora_flux_kontext.py, the body of
`for step, batch in enumerate(train_dataloader)` and its `get_sigmas` helper, in the script's order, on the path
fluxnb trains: `--cache_latents` with a conditioning image (`has_image_input`), cached text embeddings, no prior
preservation, no text-encoder training. `args.*` / `accelerator.*` became arguments; the backward and optimizer
lines are left out (the test calls backward itself to compare gradients). Unlike the older script that
tests/reference_step.py transcribes, this one already calls today's `_prepare_latent_image_ids` (packed grid) and
`_unpack_latents` (vae_scale_factor 2 ** (len - 1)): nothing had to be adapted. (diffusers: Apache-2.0.)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import FluxKontextPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


def reference_kontext_loss(transformer, noise_scheduler_copy, latent_dist, cond_latent_dist, batch,
                           args: SimpleNamespace, vae_config, weight_dtype=torch.float32,
                           device=torch.device("cpu")) -> torch.Tensor:
    """The script's loss for one batch; `latent_dist` / `cond_latent_dist` stand for latents_cache[step] and
    cond_latents_cache[step]. Random draws come from torch's global RNG, in the script's order."""

    class accelerator:  # noqa: N801 - the names the script uses
        pass

    accelerator.device = device
    vae_config_shift_factor = vae_config.shift_factor
    vae_config_scaling_factor = vae_config.scaling_factor
    vae_config_block_out_channels = vae_config.block_out_channels
    has_image_input = True
    has_guidance = transformer.config.guidance_embeds
    prompt_embeds, pooled_prompt_embeds, text_ids = (batch["prompt_embeds"], batch["pooled_prompt_embeds"],
                                                     batch["text_ids"])

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
    # Convert images to latent space
    if args.vae_encode_mode == "sample":
        model_input = latent_dist.sample()
        if has_image_input:
            cond_model_input = cond_latent_dist.sample()
    else:
        model_input = latent_dist.mode()
        if has_image_input:
            cond_model_input = cond_latent_dist.mode()
    model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
    model_input = model_input.to(dtype=weight_dtype)
    if has_image_input:
        cond_model_input = (cond_model_input - vae_config_shift_factor) * vae_config_scaling_factor
        cond_model_input = cond_model_input.to(dtype=weight_dtype)

    vae_scale_factor = 2 ** (len(vae_config_block_out_channels) - 1)

    latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(
        model_input.shape[0],
        model_input.shape[2] // 2,
        model_input.shape[3] // 2,
        accelerator.device,
        weight_dtype,
    )
    if has_image_input:
        cond_latents_ids = FluxKontextPipeline._prepare_latent_image_ids(
            cond_model_input.shape[0],
            cond_model_input.shape[2] // 2,
            cond_model_input.shape[3] // 2,
            accelerator.device,
            weight_dtype,
        )
        cond_latents_ids[..., 0] = 1
        latent_image_ids = torch.cat([latent_image_ids, cond_latents_ids], dim=0)

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
    packed_noisy_model_input = FluxKontextPipeline._pack_latents(
        noisy_model_input,
        batch_size=model_input.shape[0],
        num_channels_latents=model_input.shape[1],
        height=model_input.shape[2],
        width=model_input.shape[3],
    )
    orig_inp_shape = packed_noisy_model_input.shape
    if has_image_input:
        packed_cond_input = FluxKontextPipeline._pack_latents(
            cond_model_input,
            batch_size=cond_model_input.shape[0],
            num_channels_latents=cond_model_input.shape[1],
            height=cond_model_input.shape[2],
            width=cond_model_input.shape[3],
        )
        packed_noisy_model_input = torch.cat([packed_noisy_model_input, packed_cond_input], dim=1)

    # Kontext always has guidance
    guidance = None
    if has_guidance:
        guidance = torch.tensor([args.guidance_scale], device=accelerator.device)
        guidance = guidance.expand(model_input.shape[0])

    # Predict the noise residual
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    if has_image_input:
        model_pred = model_pred[:, : orig_inp_shape[1]]
    model_pred = FluxKontextPipeline._unpack_latents(
        model_pred,
        height=model_input.shape[2] * vae_scale_factor,
        width=model_input.shape[3] * vae_scale_factor,
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
