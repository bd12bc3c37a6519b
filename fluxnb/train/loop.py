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
import shutil
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
from ..run import Run
from . import checkpoint, flow, speed
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
    already_trained: bool = False  # the run had reached max_train_steps before this call: nothing was trained

    def __str__(self) -> str:
        if self.train_loss_before is None or self.train_loss_after is None:
            return f"step {self.step}: no training-set loss measured in this run yet"
        change = 100 * (1 - self.train_loss_after / self.train_loss_before)
        done = "when this run was trained" if self.already_trained else "in this session"
        return (f"training-set loss, fixed noise: {self.train_loss_before:.4f} -> {self.train_loss_after:.4f} "
                f"({change:.0f}% lower), {self.seconds:.0f} s of training {done}")


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


def _start_point(run: Run, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume from (or None), after refusing to silently clobber an earlier run."""
    previous = checkpoint.latest(run.dir)
    lora_file = run.dir.lora_file
    if overwrite:
        for path in (run.dir.checkpoints, run.dir.lora, run.dir.images):
            shutil.rmtree(path, ignore_errors=True)
        run.dir.metrics.unlink(missing_ok=True)
        return None
    if resume:
        return previous
    if previous is not None or lora_file.is_file():
        done = f"up to step {previous.step}" if previous else "a finished LoRA"
        raise FluxnbError(f"{run.dir.root} already holds a training run ({done}): resume it (resume=True / --resume) "
                          "or start over (overwrite=True / --overwrite, which deletes its checkpoints, samples and "
                          "LoRA).")
    return None


def _already_trained(run: Run, last: checkpoint.Checkpoint) -> TrainResult:
    """A run that reached max_train_steps and saved its LoRA is left as it is: re-running a notebook series must
    neither retrain it nor look like a failed run. Its numbers come from the last checkpoint."""
    info, total = last.info(), run.config.train.max_train_steps
    print(f"fluxnb: {run.dir.root} is already trained (step {last.step} of {total}; its LoRA is "
          f"{run.dir.lora_file}): nothing to train. To train longer raise train.max_train_steps (--max-steps N); "
          "to start over pass overwrite=True (--overwrite).")
    return TrainResult(last.step, run.dir.lora_file, last.path, train_loss_before=info.get("train_loss_before"),
                       train_loss_after=info.get("train_loss_after"), seconds=info.get("train_seconds", 0.0),
                       already_trained=True)


def _check_same_adapter(run: Run, ckpt: checkpoint.Checkpoint) -> None:
    then = ckpt.config()
    if then.lora != run.config.lora or then.model.model_id != run.config.model.model_id:
        raise FluxnbError(f"{ckpt.path} was trained with LoRA {then.lora} on {then.model.model_id}; the config now "
                          f"asks for {run.config.lora} on {run.config.model.model_id}. Put the old values back to "
                          "resume, or start over with overwrite=True (--overwrite).")
    changed = sorted(k for k, v in then.train.__dict__.items() if getattr(run.config.train, k) != v)
    if changed:
        print(f"fluxnb: resuming with changed training settings {changed}; the optimizer and LR schedule continue "
              "from the checkpoint's state.")


def _check_resolution(run: Run) -> None:
    """Sample grids are drawn at data.width x height; the latents must have been cached at that size too."""
    cached, now = latents.cached_size(run.dir), (run.config.data.width, run.config.data.height)
    if cached is not None and cached != now:
        raise FluxnbError(f"the latents in {run.dir.latents} were cached at {cached[0]}x{cached[1]}, but the config "
                          f"now says {now[0]}x{now[1]}: put the resolution back, or re-run notebook 02 "
                          "(python -m fluxnb latents --overwrite) at the new size.")


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


def train(run: Run, *, transformer=None, resume: bool = True, overwrite: bool = False, max_steps: int | None = None,
          stop_after: int | None = None, live: bool | None = None) -> TrainResult:
    """Train (or continue training) the LoRA of `run`; see the module docstring.

    transformer: an already prepared model (`prepare_transformer`), else it is built here. max_steps: a new
    total for train.max_train_steps, saved to config.json. stop_after: pause after this optimizer step (a
    checkpoint is written; the LR schedule still aims at max_train_steps). live: redraw plots in a notebook.
    """
    from accelerate import Accelerator

    _check_resolution(run)
    start = _start_point(run, resume, overwrite)
    if max_steps is not None:
        run.config = run.config.replace(train={"max_train_steps": max_steps})
        run.save()
    cfg, hw, tc = run.config, run.hw, run.config.train
    if start is not None:
        _check_same_adapter(run, start)
        if start.step >= tc.max_train_steps and run.dir.lora_file.is_file():
            return _already_trained(run, start)
    live = in_notebook() if live is None else live
    data = TrainingData(run.dir, tc.batch_size, tc.seed)
    latent, table, scheduler = load_scales(run)
    sampler = make_sampler(run, scheduler)

    with cpu_threads(hw), speed.attention_backends(hw):
        model = transformer if transformer is not None else prepare_transformer(run)
        accelerator = Accelerator(mixed_precision=MIXED_PRECISION[hw.dtype], cpu=hw.device.type == "cpu",
                                  gradient_accumulation_steps=tc.gradient_accumulation_steps)
        wrapped = accelerator.prepare(model)  # autocast in the compute dtype around the forward
        speed.prepare(model, cfg.model, tc, hw)  # checkpointing, block offload, compiled blocks (fluxnb.train.speed)
        state = TrainState.create(model, tc, accelerator)
        if start is not None:
            checkpoint.restore(start, state)
            print(f"fluxnb: resuming from {start.path} (step {state.step} of {tc.max_train_steps})")
        metrics = MetricsLog(run.dir.metrics)
        history = metrics.truncate(state.step)
        print(memory.report(f"memory after loading ({hw.describe()})"))

        def save_checkpoint(loss: float) -> Path:
            return checkpoint.save(run.dir, cfg, state, info={"loss": loss, "lr": state.lr}, keep=tc.keep_checkpoints).path

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
            print(f"\nfluxnb: interrupted at step {state.step}; run again with resume=True to continue from "
                  f"{result.checkpoint or 'the start (no checkpoint yet)'}.")
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
            # Kept with the last checkpoint, so a later call on this finished run can report them (_already_trained).
            checkpoint.annotate(checkpoint.latest(run.dir), train_loss_before=result.train_loss_before,
                                train_loss_after=result.train_loss_after, train_seconds=round(result.seconds, 1))
            result.lora = lora.save_lora(model, run.dir.lora)
            print(f"fluxnb: LoRA saved to {result.lora}")
        print(memory.report("memory at the end"))
    return result
