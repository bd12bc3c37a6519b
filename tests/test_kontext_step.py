"""FLUX.1-Kontext-dev's training step: fluxnb.train.step.training_step with "control_latents" against diffusers'
Kontext LoRA script (tests/reference_kontext_step.py), on the tiny model with a LoRA; and the batches that feed it."""

import json

import numpy as np
from types import SimpleNamespace

import peft
import pytest
import torch
from reference_kontext_step import reference_kontext_loss

from fluxnb.config import KONTEXT, TrainConfig
from fluxnb.train import flow
from fluxnb.train.batches import TrainingData
from fluxnb.train.step import LatentScale, training_step


@pytest.fixture(scope="module")
def kontext(tiny_assets):
    """The tiny pipeline, its transformer with a LoRA whose A and B are both random (so both get gradients), and
    four 64x96 images of the tiny dataset through its VAE: two targets and, as their controls, the other two."""
    import numpy as np
    from diffusers import FluxPipeline
    from PIL import Image

    pipe = FluxPipeline.from_pretrained(tiny_assets.model, dtype=torch.float32)
    pipe.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    rows = [json.loads(line) for line in (tiny_assets.dataset / "metadata.jsonl").read_text().splitlines()]
    files = [tiny_assets.dataset / r["file_name"] for r in rows]
    files = [f for f in files if Image.open(f).size == (64, 96)][:4]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for f in files])
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist  # (4, 16, 12, 8)
        embeds, pooled, text_ids = pipe.encode_prompt([r["text"] for r in rows[:2]], prompt_2=None,
                                                      max_sequence_length=77)
    mean, std = dist.mean.contiguous(), dist.std.contiguous()
    batch = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids,
             "latent_mean": mean[:2].contiguous(), "latent_std": std[:2].contiguous(),
             "control_latents": mean[2:].contiguous()}
    return pipe, batch


def _lora_grads(transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if "lora_" in n and p.grad is not None}


def _reference(pipe, batch, scheduler, cfg: TrainConfig, seed: int):
    """The script's loss and LoRA gradients on fluxnb's inputs. fluxnb draws the target's latent from its cached
    posterior first (then noise, then timesteps); the script's default vae_encode_mode "mode" draws nothing there.
    So the same draw is made on torch's global RNG and handed to the script as the target's cached latent; its
    noise and timesteps then come from the same numbers as fluxnb's. The control is the posterior mean in both."""
    args = SimpleNamespace(weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                           mode_scale=cfg.mode_scale, guidance_scale=cfg.guidance_scale, vae_encode_mode="mode")
    torch.manual_seed(seed)
    drawn = flow.sample_latents(batch["latent_mean"], batch["latent_std"], None)  # fluxnb's first draw
    target = SimpleNamespace(mode=lambda: drawn)
    control = SimpleNamespace(mode=lambda: batch["control_latents"])
    pipe.transformer.zero_grad(set_to_none=True)
    loss = reference_kontext_loss(pipe.transformer, scheduler, target, control, batch, args, pipe.vae.config)
    loss.backward()
    return loss.detach(), _lora_grads(pipe.transformer)


def _ours(pipe, batch, table, cfg: TrainConfig, generator):
    pipe.transformer.zero_grad(set_to_none=True)
    latent = LatentScale.from_vae_config(pipe.vae.config)
    loss = training_step(pipe.transformer, batch, table, cfg, latent, generator, torch.float32)
    loss.backward()
    return loss.detach(), _lora_grads(pipe.transformer)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "cosmap"])
def test_kontext_step_matches_the_reference_script(kontext, scheme):
    """Same inputs (latents, noise, timesteps, control latents), same CPU fp32 operations in the same order: the
    loss and every LoRA gradient agree to float32 rounding (rtol 1e-5: the only freedom left is the order in which
    autograd accumulates a parameter's gradient, which both share; measured differences are 0)."""
    pipe, batch = kontext
    cfg = TrainConfig(weighting_scheme=scheme, guidance_scale=1.0, mode_scale=1.29)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    table = flow.NoiseTable.from_scheduler(scheduler)
    expected, expected_grads = _reference(pipe, batch, scheduler, cfg, 7)
    got, grads = _ours(pipe, batch, table, cfg, torch.Generator().manual_seed(7))
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    # not vacuous: another control image gives another loss (the control reaches the prediction)
    other = {**batch, "control_latents": batch["control_latents"].flip(0)}
    assert _ours(pipe, other, table, cfg, torch.Generator().manual_seed(7))[0].item() != pytest.approx(
        expected.item(), rel=1e-5)


def test_without_control_the_step_is_the_text_to_image_one(kontext):
    """No "control_latents": the same loss as before Kontext (the reference test in tests/test_flow.py pins it)."""
    pipe, batch = kontext
    cfg = TrainConfig()
    table = flow.NoiseTable.from_scheduler(pipe.scheduler.__class__.from_config(pipe.scheduler.config))
    plain = {k: v for k, v in batch.items() if k != "control_latents"}
    with_control = _ours(pipe, batch, table, cfg, torch.Generator().manual_seed(3))[0]
    without = _ours(pipe, plain, table, cfg, torch.Generator().manual_seed(3))[0]
    assert with_control.item() != pytest.approx(without.item(), rel=1e-5)


class _Spy(torch.nn.Module):
    """The transformer, recording what the step feeds it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


def test_control_tokens_follow_the_target_and_flux_shift_counts_the_target(kontext):
    pipe, batch = kontext
    spy = _Spy(pipe.transformer)
    cfg = TrainConfig(weighting_scheme="flux_shift", sigmoid_scale=1.5)
    table = flow.NoiseTable.from_scheduler(pipe.scheduler.__class__.from_config(pipe.scheduler.config))
    with torch.no_grad():
        training_step(spy, batch, table, cfg, LatentScale.from_vae_config(pipe.vae.config),
                      [torch.Generator().manual_seed(s) for s in (5, 6)], torch.float32)  # the loop's per-sample RNG
    call = spy.calls[0]
    assert call["hidden_states"].shape == (2, 2 * 24, 64)  # 6 x 4 target tokens, then as many control tokens
    ids = call["img_ids"]
    assert ids[:24, 0].eq(0).all() and ids[24:, 0].eq(1).all()
    torch.testing.assert_close(ids[24:, 1:], ids[:24, 1:])  # the same grid, told apart by the first coordinate
    for i, seed in enumerate((5, 6)):  # each sample's sigma: shifted for its target's 24 tokens, not 48
        g = torch.Generator().manual_seed(seed)
        flow.sample_noise(flow.sample_latents(batch["latent_mean"][i : i + 1], batch["latent_std"][i : i + 1], g), g)
        torch.testing.assert_close(call["timestep"][i : i + 1], flow.flux_shift_sigmas(1, 24, 1.5, g))


def test_collate_carries_the_control_latents():
    item = {"latent_mean": torch.zeros(16, 4, 6), "latent_std": torch.ones(16, 4, 6),
            "prompt_embeds": torch.zeros(7, 4096), "pooled_prompt_embeds": torch.zeros(768),
            "text_ids": torch.zeros(7, 3)}
    plain = TrainingData.collate([item, item], torch.device("cpu"), torch.bfloat16)
    assert "control_latents" not in plain
    paired = [item | {"control_latents": torch.full((16, 4, 6), float(k))} for k in (1, 2)]
    batch = TrainingData.collate(paired, torch.device("cpu"), torch.bfloat16)
    assert batch["control_latents"].shape == (2, 16, 4, 6) and batch["control_latents"].dtype == torch.float32
    assert batch["control_latents"][:, 0, 0, 0].tolist() == [1.0, 2.0]


def _sampler_run(tmp_path, tmp_path_factory):
    from train_helpers import make_run

    from fluxnb.run.hardware import Hardware

    run = make_run(tmp_path / "run", tmp_path_factory)
    run.hw = Hardware("tiny", torch.device("cpu"), torch.bfloat16, None, "bf16 on the CPU, as a GPU would run")
    return run


def test_kontext_sample_grid_edits_each_prompts_control(tmp_path, tmp_path_factory, monkeypatch):
    """With controls the sampler renders through FluxKontextPipeline at data.width x data.height (the control's
    tokens ride along: 2 x 24 image tokens at 64x96), each prompt with its own control, and the grid shows each
    control beside its result."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from PIL import Image

    from fluxnb.train import load_for_training, monitor

    run = _sampler_run(tmp_path, tmp_path_factory)
    transformer = load_for_training(run)
    model_id = run.config.model.model_id
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", dtype=torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler")
    prompts = run.config.data.validation_prompts[:2]
    controls = [Image.new("RGB", (64, 96), color) for color in ("white", "navy")]
    calls = []
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    sampler = monitor.ValidationSampler(run.dir, prompts, scheduler, vae, run.hw, 64, 96, steps=2,
                                        controls=controls)
    images = sampler.images(transformer)
    hook.remove()
    assert [im.size for im in images] == [(64, 96)] * 2
    assert calls[0]["hidden_states"].shape[1] == 2 * 24 and calls[0]["img_ids"][24:, 0].eq(1).all()
    same_seed = monitor.ValidationSampler(run.dir, prompts[:1], scheduler, vae, run.hw, 64, 96, steps=2,
                                          controls=controls[1:])  # prompt 0 with the other control
    assert (np.asarray(same_seed.images(transformer)[0]) != np.asarray(images[0])).any()
    shown = {}
    monkeypatch.setattr(monitor, "image_grid", lambda ims, caps, **kw: shown.update(ims=ims, caps=caps, **kw)
                        or monitor_figure())
    assert sampler.grid(transformer, 5, live=False).is_file()
    assert shown["ims"][0] is controls[0] and shown["ims"][2] is controls[1] and shown["ncols"] == 4
    assert shown["caps"] == ["input", prompts[0], "input", prompts[1]]


def monitor_figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(1, 1))


def test_make_sampler_gives_a_kontext_run_its_validation_controls(tmp_path, tmp_path_factory, monkeypatch):
    """make_sampler takes the controls from validation_controls(run) for a FLUX.1-Kontext-dev run (the data side's
    function; a stand-in here, so this holds whichever way that module is built), and none otherwise."""
    import sys
    import types

    from PIL import Image

    from fluxnb.train import session

    run = _sampler_run(tmp_path, tmp_path_factory)
    run.config = run.config.replace(train={"sample_every": 1})
    controls = [Image.new("RGB", (run.config.data.width, run.config.data.height))]
    stand_in = types.ModuleType("fluxnb.data.controls")
    stand_in.validation_controls = lambda r: controls if r is run else None
    monkeypatch.setitem(sys.modules, "fluxnb.data.controls", stand_in)
    scheduler = session.load_scales(run)[2]
    assert session.make_sampler(run, scheduler).controls is None  # FLUX.1-dev: text to image
    run.config = run.config.replace(model={"base": KONTEXT})
    assert session.make_sampler(run, scheduler).controls is controls


def test_paired_items_train_through_the_loops_batches(tmp_path, tmp_path_factory):
    """Items that carry "control_latents" (as the latents cache loads them for FLUX.1-Kontext-dev) reach the step
    through TrainingData's micro-batches and the fixed-noise evaluation; here each control is its target mirrored."""
    from fluxnb.train import load_for_training
    from fluxnb.train.session import load_scales
    from fluxnb.train.step import evaluate

    run = _sampler_run(tmp_path, tmp_path_factory)
    run.hw = run.hw.__class__("tiny", torch.device("cpu"), torch.float32, None, "fp32 on the CPU")
    transformer = load_for_training(run)
    latent, table, _ = load_scales(run)
    data = TrainingData(run.dir, batch_size=2, seed=0)
    plain = evaluate(transformer, data, table, run.config.train, latent, run.hw, limit=2)
    for item in data.items:
        item["control_latents"] = item["latent_mean"].flip(-1)
    micro = data.micro_batches(0, 0, torch.device("cpu"), torch.float32)[0]
    assert micro.batch["control_latents"].shape == micro.batch["latent_mean"].shape
    loss = training_step(transformer, micro.batch, table, run.config.train, latent, micro.generators, torch.float32)
    assert torch.isfinite(loss)
    paired = evaluate(transformer, data, table, run.config.train, latent, run.hw, limit=2)
    assert paired != pytest.approx(plain, rel=1e-6)  # the controls took part
