"""The QLoRA training loop: NF4 FLUX transformer + LoRA, trained on the cached latents and text embeddings.

    result = train(run)                      # notebook 03, or `python -m fluxnb train --run-dir RUN`

Only the transformer is on the GPU: the text encoders ran once in notebook 01 (embeddings/), the VAE once in
notebook 02 (latents/) and waits on the CPU to decode sample grids. One optimizer step = accumulation x micro-batch,
each micro-batch one `training_step` (fluxnb.train.step, the math in fluxnb.train.flow). Every `checkpoint_every`
steps the TrainState goes to checkpoints/step-N (fluxnb.train.checkpoint): `train(run, resume=True)` replays the run
from there exactly. At the end: RUN/lora/pytorch_lora_weights.safetensors, for stock `FluxPipeline.load_lora_weights`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import memory
from ..data import latents
from ..errors import FluxnbError
from ..hub_errors import hub_errors
from ..model import lora
from ..model.quant import load_transformer
from ..run import Run, writes
from . import checkpoint, flow, guard, speed
from .batches import TrainingData
from .monitor import MetricsLog, Progress, ValidationSampler, in_notebook
from .state import TrainState
from .step import LatentScale, evaluate, training_step

MAX_SKIPPED_FP16_STEPS = 20  # the fp16 loss scaler skips a step on inf gradients; this many in a row is divergence
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}  # accelerate's names


class TrainingDiverged(FluxnbError, FloatingPointError):
    """The loss or the gradients stopped being finite numbers; nothing broken was saved."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done so far in this run directory
    lora: Path | None  # RUN/lora/pytorch_lora_weights.safetensors, once max_train_steps is reached
    checkpoint: Path | None  # the newest checkpoint
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    train_loss_before: float | None = None  # fixed-noise training-set loss (fluxnb.step.evaluate)
    train_loss_after: float | None = None
    interrupted: bool = False
    seconds: float = 0.0


@contextlib.contextmanager
def cpu_threads(hw):
    """One thread for the tiny profile: its matrices are 32 wide, so thread hand-offs cost more than the math
    (measured here: 150 ms vs 12 ms per step on 2 busy cores). Restored afterwards."""
    if hw.profile != "tiny" or hw.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_transformer(run: Run):
    """Load the transformer as run.config.model says (fluxnb.model.quant) and add the seeded LoRA adapter."""
    transformer = load_transformer(run.config.model, run.hw)
    lora.add_lora(transformer, run.config.lora, seed=run.config.train.seed)
    return transformer


def _diverged(what: str, step: int, last: Path | None, hw) -> TrainingDiverged:
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    fp16 = (" On fp16 (T4-class GPUs, no bf16) the usual cause is overflow: set model.dtype='fp32' if memory allows."
            if hw.dtype == torch.float16 else "")
    return TrainingDiverged(f"{what} at optimizer step {step + 1}: training stopped and no LoRA was saved; {where}. "
                            f"Lower train.learning_rate (e.g. halve it) and keep max_grad_norm at 1.0, then run again "
                            f"with resume=True (--resume).{fp16}")


def load_scales(run: Run):
    """The VAE's latent shift/scale and the scheduler's training noise table, from their configs alone (kilobytes),
    and the scheduler (the sample grids reuse it)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    m = run.config.model
    with hub_errors(m.model_id):
        latent = LatentScale.from_vae_config(AutoencoderKL.load_config(m.model_id, subfolder="vae", revision=m.revision))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(m.model_id, subfolder="scheduler",
                                                                    revision=m.revision)
    # The table copies the training timesteps before sampling's set_timesteps rewrites the shared scheduler.
    return latent, flow.NoiseTable.from_scheduler(scheduler), scheduler


def make_sampler(run: Run, scheduler) -> ValidationSampler | None:
    """The sample-grid maker (its VAE, 168 MB in bf16, waits on the CPU between grids), or None if never used."""
    cfg, tc = run.config, run.config.train
    if not tc.sample_every:
        return None
    vae = latents.load_vae(cfg.model, replace(run.hw, device=torch.device("cpu")))
    return ValidationSampler(run.dir, cfg.data.validation_prompts, scheduler, vae, run.hw, cfg.data.width,
                             cfg.data.height, tc.sample_steps, seed=tc.seed)


@writes("train")  # the run's lock, for the whole call (fluxnb.lock)
@guard.watching_interrupts  # a Ctrl-C is never lost, not even one swallowed by a __del__
def train(run: Run, *, transformer=None, resume: bool = True, overwrite: bool = False, max_steps: int | None = None,
          stop_after: int | None = None, live: bool | None = None,
          how_to_resume: str = guard.RESUME_IN_PYTHON) -> TrainResult:
    """Train (or continue training) the LoRA of `run`; see the module docstring.

    transformer: an already prepared model (`prepare_transformer`), else it is built here. max_steps: a new
    total for train.max_train_steps, saved to config.json. stop_after: pause after this optimizer step (a
    checkpoint is written; the LR schedule still aims at max_train_steps). live: redraw plots in a notebook.
    how_to_resume: what a stopped run tells the user to type (the CLI's own command line).
    """
    from accelerate import Accelerator

    # Everything that can fail is checked before --overwrite deletes anything (fluxnb.train.guard).
    if max_steps is not None:
        run.config = run.config.replace(train={"max_train_steps": max_steps})  # validated here, saved below
    guard.check_inputs(run)
    start = guard.start_point(run, resume, overwrite)
    guard.check_resumable(run, start)
    cfg, hw, tc = run.config, run.hw, run.config.train
    live = in_notebook() if live is None else live
    data = TrainingData(run.dir, tc.batch_size, tc.seed)
    trained_on = guard.data_fingerprint(run)  # recorded in every checkpoint: resume refuses other data
    latent, table, scheduler = load_scales(run)
    sampler = make_sampler(run, scheduler)

    with cpu_threads(hw), speed.attention_backends(hw):
        model = transformer if transformer is not None else prepare_transformer(run)
        accelerator = Accelerator(mixed_precision=MIXED_PRECISION[hw.dtype], cpu=hw.device.type == "cpu",
                                  gradient_accumulation_steps=tc.gradient_accumulation_steps)
        wrapped = accelerator.prepare(model)  # autocast in the compute dtype around the forward
        speed.prepare(model, cfg.model, tc, hw)  # checkpointing, block offload, compiled blocks (fluxnb.train.speed)
        state = TrainState.create(model, tc, accelerator)
        if overwrite:
            guard.clear_previous(run)  # last, once the data, the model and the LoRA all loaded
        if max_steps is not None:
            run.save()
        if start is not None:
            checkpoint.restore(start, state)
            print(f"fluxnb: resuming from {start.path} (step {state.step} of {tc.max_train_steps})")
        metrics = MetricsLog(run.dir.metrics)
        history = metrics.truncate(state.step)
        print(memory.report(f"memory after loading ({hw.describe()})"))

        def save_checkpoint(loss: float) -> Path:
            return checkpoint.save(run.dir, cfg, state, info={"loss": loss, "lr": state.lr, **trained_on},
                                   keep=tc.keep_checkpoints).path

        target = tc.max_train_steps if stop_after is None else min(stop_after, tc.max_train_steps)
        newest = checkpoint.latest(run.dir)
        result = TrainResult(state.step, None, newest.path if newest else None)
        result.train_loss_before = evaluate(wrapped, data, table, tc, latent, hw, autocast=accelerator.autocast)
        if sampler is not None and state.step == 0:  # the base model's images, to compare the later grids with
            sampler.grid(model, 0, live)
        progress = Progress(run.dir, tc.max_train_steps, state.step, history, live)
        began, window, skipped = time.perf_counter(), [], 0
        wrapped.train()
        try:
            while state.step < target:
                guard.check_interrupted()
                batch = data.batch(state.micro, hw.device, hw.dtype)  # micro-batch k: a function of (seed, k)
                state.micro += 1
                with accelerator.accumulate(wrapped):  # loss / accumulation; the real step every N-th call
                    loss = training_step(wrapped, batch, table, tc, latent, state.generator, hw.dtype)
                    window.append(loss.item())
                    if not math.isfinite(window[-1]):
                        raise _diverged(f"the loss became {window[-1]}", state.step, result.checkpoint, hw)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(state.params, tc.max_grad_norm).item()
                        skipped = skipped + 1 if not math.isfinite(grad_norm) else 0  # fp16: the scaler skips it
                        if skipped and (state.scaler is None or skipped > MAX_SKIPPED_FP16_STEPS):
                            raise _diverged(f"the gradient norm became {grad_norm}", state.step, result.checkpoint, hw)
                    state.optimizer.step()  # skipped by accelerate between accumulation boundaries
                    state.schedule.step()
                    state.optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                row = {"step": state.step, "loss": sum(window) / len(window), "lr": state.lr, "grad_norm": grad_norm,
                       "epoch": (state.micro - 1) // data.batches_per_epoch,
                       "seconds": round(time.perf_counter() - began, 3)}
                row |= {k: round(v, 3) for k, v in memory.snapshot().items() if k.startswith("gpu_peak")}
                window = []
                metrics.append(row)
                result.losses.append(row["loss"])
                progress.update(row)
                if sampler and tc.sample_every and state.step % tc.sample_every == 0:
                    sampler.grid(model, state.step, live)
                if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                    result.checkpoint = save_checkpoint(row["loss"])
        except KeyboardInterrupt:
            result.interrupted = True
            newest = checkpoint.latest(run.dir)  # from disk: Ctrl-C may land in save() after its rename
            result.checkpoint = newest.path if newest else None
            where = f"from {newest.path} (step {newest.step})" if newest else "from step 0 (no checkpoint yet)"
            print(f"\nfluxnb: interrupted at step {state.step}; to continue {where}: {how_to_resume}")
        finally:
            progress.close()
        result.step, result.seconds = state.step, time.perf_counter() - began
        if result.interrupted:
            return result
        if checkpoint.latest(run.dir) is None or checkpoint.latest(run.dir).step != state.step:
            result.checkpoint = save_checkpoint(result.losses[-1] if result.losses else float("nan"))
        result.train_loss_after = evaluate(wrapped, data, table, tc, latent, hw, autocast=accelerator.autocast)
        print(f"fluxnb: training-set loss (fixed noise, {min(16, len(data))} samples): "
              f"{result.train_loss_before:.4f} -> {result.train_loss_after:.4f}")
        if state.step >= tc.max_train_steps:
            result.lora = lora.save_lora(model, run.dir.lora)
            print(f"fluxnb: LoRA saved to {result.lora}")
        print(memory.report("memory at the end"))
    return result
