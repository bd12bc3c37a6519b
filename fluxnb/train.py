"""The QLoRA training loop: NF4 FLUX transformer + LoRA, trained on the cached latents and text embeddings.

    result = train(run)                      # notebook 03, or `python -m fluxnb train --run-dir RUN`

Only the transformer is on the GPU: the text encoders ran once in notebook 01 (embeddings/), the VAE once in
notebook 02 (latents/) and waits on the CPU to decode sample grids. One optimizer step = accumulation x micro-batch,
each micro-batch one `training_step` (fluxnb.step, the math in fluxnb.flow). Every `checkpoint_every` steps the
whole state goes to checkpoints/step-N (fluxnb.checkpoint): `train(run, resume=True)` replays the run from there
exactly. At the end: RUN/lora/pytorch_lora_weights.safetensors, for stock `FluxPipeline.load_lora_weights`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checkpoint, flow, lora, memory, speed
from .errors import FluxnbError
from .monitor import MetricsLog, Progress, ValidationSampler, in_notebook
from .runs import Run
from .step import LatentScale, TrainingData, evaluate, make_optimizer, training_step

__all__ = ["TrainResult", "TrainingDiverged", "prepare_transformer", "train", "training_step"]
MAX_SKIPPED_FP16_STEPS = 20  # the fp16 loss scaler skips a step on inf gradients; this many in a row is divergence


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
    """Load the transformer as run.config.model says (fluxnb.quant) and add the seeded LoRA adapter."""
    from .quant import load_transformer

    transformer = load_transformer(run.config.model, run.hw)
    lora.add_lora(transformer, run.config.lora, seed=run.config.train.seed)
    return transformer


def _start_point(run: Run, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume from (or None), after refusing to silently clobber an earlier run."""
    previous = checkpoint.latest(run.dir)
    lora_file = run.dir.lora / lora.LORA_WEIGHT_NAME
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
    import json

    meta = run.dir.latents / "meta.json"
    cached = json.loads(meta.read_text()) if meta.is_file() else {}
    now = (run.config.data.width, run.config.data.height)
    if "width" in cached and (cached["width"], cached.get("height")) != now:
        raise FluxnbError(f"the latents in {run.dir.latents} were cached at {cached['width']}x{cached.get('height')}"
                          f", but the config now says {now[0]}x{now[1]}: put the resolution back, or re-run "
                          "notebook 02 (python -m fluxnb latents --overwrite) at the new size.")


def _diverged(what: str, step: int, last: Path | None, hw) -> TrainingDiverged:
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    fp16 = (" On fp16 (T4-class GPUs, no bf16) the usual cause is overflow: set model.dtype='fp32' if memory allows."
            if hw.dtype == torch.float16 else "")
    return TrainingDiverged(f"{what} at optimizer step {step + 1}: training stopped and no LoRA was saved; {where}. "
                            f"Lower train.learning_rate (e.g. halve it) and keep max_grad_norm at 1.0, then run again "
                            f"with resume=True (--resume).{fp16}")


def _small_parts(run: Run) -> tuple[LatentScale, flow.NoiseTable, ValidationSampler | None]:
    """The VAE's latent factors and the scheduler's noise table (configs only), and the sample-grid maker
    (its VAE weights, 168 MB in bf16, stay on the CPU between grids)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from .hub_access import hub_errors
    from .latents import load_vae

    cfg, hw, t, m = run.config, run.hw, run.config.train, run.config.model
    with hub_errors(m.model_id):
        latent = LatentScale.from_vae_config(AutoencoderKL.load_config(m.model_id, subfolder="vae", revision=m.revision))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(m.model_id, subfolder="scheduler",
                                                                    revision=m.revision)
    # The table copies the training timesteps before sampling's set_timesteps rewrites the shared scheduler.
    table = flow.NoiseTable.from_scheduler(scheduler)
    if not t.sample_every:
        return latent, table, None
    vae = load_vae(m, replace(hw, device=torch.device("cpu")))
    return latent, table, ValidationSampler(run.dir, cfg.data.validation_prompts, scheduler, vae, hw,
                                            cfg.data.width, cfg.data.height, t.sample_steps, seed=t.seed)


def train(run: Run, *, transformer=None, resume: bool = True, overwrite: bool = False, max_steps: int | None = None,
          stop_after: int | None = None, live: bool | None = None) -> TrainResult:
    """Train (or continue training) the LoRA of `run`; see the module docstring.

    transformer: an already prepared model (`prepare_transformer`), else it is built here. max_steps: a new
    total for train.max_train_steps, saved to config.json. stop_after: pause after this optimizer step (a
    checkpoint is written; the LR schedule still aims at max_train_steps). live: redraw plots in a notebook.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    _check_resolution(run)
    start = _start_point(run, resume, overwrite)
    if max_steps is not None:
        run.config = run.config.replace(train={"max_train_steps": max_steps})
        run.save()
    cfg, hw, t = run.config, run.hw, run.config.train
    live = in_notebook() if live is None else live
    if start is not None:
        _check_same_adapter(run, start)
    data = TrainingData(run.dir, t.batch_size, t.seed)
    latent, table, sampler = _small_parts(run)

    with cpu_threads(hw), speed.attention_backends(hw):
        if transformer is None:
            transformer = prepare_transformer(run)
        accelerator = Accelerator(mixed_precision={torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            hw.dtype], gradient_accumulation_steps=t.gradient_accumulation_steps, cpu=hw.device.type == "cpu")
        params = [p for p in transformer.parameters() if p.requires_grad]  # the LoRA A/B matrices, fp32
        optimizer = make_optimizer(params, t)
        schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_train_steps)
        transformer, optimizer, schedule = accelerator.prepare(transformer, optimizer, schedule)
        # gradient checkpointing, block offload, torch.compile of the blocks: as the config says (fluxnb.speed)
        speed.prepare(accelerator.unwrap_model(transformer), cfg.model, t, hw)
        generator = torch.Generator().manual_seed(t.seed)  # every random draw of training_step
        step = micro = 0
        if start is not None:  # everything the checkpoint holds goes back where it came from
            lora.load_lora_(accelerator.unwrap_model(transformer), start.path)
            state = start.training_state()
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["lr_scheduler"])
            if accelerator.scaler is not None and state.get("scaler"):
                accelerator.scaler.load_state_dict(state["scaler"])  # fp16 loss scale
            checkpoint.set_rng_state(state["rng"], generator)
            step, micro = state["step"], state["micro_step"]  # micro-batches seen: fixes the data order
            print(f"fluxnb: resuming from {start.path} (step {step} of {t.max_train_steps})")
        metrics = MetricsLog(run.dir.metrics)
        history = metrics.truncate(step)
        print(memory.report(f"memory after loading ({hw.describe()})"))

        def save_checkpoint(loss: float) -> checkpoint.Checkpoint:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                     "rng": checkpoint.rng_state(generator), "step": step, "micro_step": micro}
            return checkpoint.save(run.dir, cfg, step, transformer=accelerator.unwrap_model(transformer),
                                   training_state=state, info={"loss": loss, "lr": schedule.get_last_lr()[0]},
                                   keep=t.keep_checkpoints)

        target = t.max_train_steps if stop_after is None else min(stop_after, t.max_train_steps)
        newest = checkpoint.latest(run.dir)
        result = TrainResult(step, None, newest.path if newest else None)
        result.train_loss_before = evaluate(transformer, data, table, t, latent, hw, autocast=accelerator.autocast)
        if sampler is not None and step == 0:  # the base model's images, to compare the later grids with
            sampler.grid(accelerator.unwrap_model(transformer), 0, live)
        progress = Progress(run.dir, t.max_train_steps, step, history, live)
        began, window, skipped = time.perf_counter(), [], 0
        transformer.train()
        try:
            while step < target:
                batch = data.batch(micro, hw.device, hw.dtype)
                micro += 1
                with accelerator.accumulate(transformer):  # loss / accumulation; the real step every N-th call
                    loss = training_step(transformer, batch, table, t, latent, generator, hw.dtype)
                    window.append(loss.item())
                    if not math.isfinite(window[-1]):
                        raise _diverged(f"the loss became {window[-1]}", step, result.checkpoint, hw)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm).item()
                        skipped = skipped + 1 if not math.isfinite(grad_norm) else 0
                        if skipped and (accelerator.scaler is None or skipped > MAX_SKIPPED_FP16_STEPS):
                            raise _diverged(f"the gradient norm became {grad_norm}", step, result.checkpoint, hw)
                    optimizer.step()  # skipped by accelerate between accumulation boundaries
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                row = {"step": step, "loss": sum(window) / len(window), "lr": schedule.get_last_lr()[0],
                       "grad_norm": grad_norm, "epoch": (micro - 1) // data.batches_per_epoch,
                       "seconds": round(time.perf_counter() - began, 3)}
                row |= {k: round(v, 3) for k, v in memory.snapshot().items() if k.startswith("gpu_peak")}
                window = []
                metrics.append(row)
                result.losses.append(row["loss"])
                progress.update(row)
                if sampler and t.sample_every and step % t.sample_every == 0:
                    sampler.grid(accelerator.unwrap_model(transformer), step, live)
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    result.checkpoint = save_checkpoint(row["loss"]).path
        except KeyboardInterrupt:
            result.interrupted = True
            print(f"\nfluxnb: interrupted at step {step}; run again with resume=True to continue from "
                  f"{result.checkpoint or 'the start (no checkpoint yet)'}.")
        finally:
            progress.close()
        result.step, result.seconds = step, time.perf_counter() - began
        if result.interrupted:
            return result
        if checkpoint.latest(run.dir) is None or checkpoint.latest(run.dir).step != step:
            result.checkpoint = save_checkpoint(result.losses[-1] if result.losses else float("nan")).path
        result.train_loss_after = evaluate(transformer, data, table, t, latent, hw, autocast=accelerator.autocast)
        print(f"fluxnb: training-set loss (fixed noise, {min(16, len(data))} samples): "
              f"{result.train_loss_before:.4f} -> {result.train_loss_after:.4f}")
        if step >= t.max_train_steps:
            result.lora = lora.save_lora(accelerator.unwrap_model(transformer), run.dir.lora)
            print(f"fluxnb: LoRA saved to {result.lora}")
        print(memory.report("memory at the end"))
    return result
