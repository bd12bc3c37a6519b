"""The QLoRA training loop: NF4 FLUX transformer + LoRA, trained on the cached latents and text embeddings.

    result = train(run)                      # notebook 03, or `python -m fluxnb train --run-dir RUN`

Only the transformer is on the GPU: the text encoders ran once in notebook 01 (embeddings/), the VAE once in
notebook 02 (latents/) and waits on the CPU to decode sample grids. One optimizer step = processes x accumulation x micro-batch,
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
from ..budget import tokens_per_sample
from ..data import latents
from ..errors import FluxnbError
from ..hub_errors import hub_errors
from ..model import lora
from ..model.quant import load_transformer
from ..run import Run, writes
from . import checkpoint, flow, guard, speed, validation
from .batches import TrainingData
from .monitor import MetricsLog, Progress, ValidationSampler, in_notebook
from .state import TrainState
from .step import LatentScale, evaluate, training_step

MAX_SKIPPED_FP16_STEPS = 20  # the fp16 loss scaler skips a step on inf gradients; this many in a row is divergence
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}  # accelerate's names


class TrainingDiverged(FluxnbError, FloatingPointError):
    """The loss or the gradients stopped being finite numbers; nothing broken was saved."""


class TrainingOutOfMemory(FluxnbError, torch.OutOfMemoryError):
    """The GPU ran out of memory during training: what to change, and where the run stands."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done so far in this run directory
    lora: Path | None  # RUN/lora/pytorch_lora_weights.safetensors, once max_train_steps is reached
    checkpoint: Path | None  # the newest checkpoint
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    train_loss_before: float | None = None  # fixed-noise training-set loss (fluxnb.step.evaluate)
    train_loss_after: float | None = None
    best_checkpoint: Path | None = None  # the lowest validation loss (fluxnb.train.validation)
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


def _diverged(what: str, step: int, last: Path | None, hw, how_to_resume: str) -> TrainingDiverged:
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    fp16 = (" On fp16 (T4-class GPUs, no bf16) the usual cause is overflow: set model.dtype='fp32' if memory allows."
            if hw.dtype == torch.float16 else "")
    return TrainingDiverged(f"{what} at optimizer step {step + 1}: training stopped and no LoRA was saved; {where}. "
                            f"Lower train.learning_rate (e.g. halve it) and keep max_grad_norm at 1.0, then continue "
                            f"with {how_to_resume}.{fp16}")


def _out_of_memory(step: int, last: Path | None, tc, hw, how_to_resume: str) -> TrainingOutOfMemory:
    where = f"the newest checkpoint is {last}" if last else "no checkpoint was written yet"
    peak = (f" (peak {torch.cuda.max_memory_allocated(hw.device) / 2**30:.1f} GiB allocated)"
            if hw.device.type == "cuda" else "")
    card = f" ({hw.gpu.total_gib:.1f} GiB)" if hw.gpu is not None else ""
    restart = "restart this notebook's kernel (it holds the failed step's memory), then " if in_notebook() else ""
    return TrainingOutOfMemory(
        f"the GPU{card} ran out of memory in optimizer step {step + 1}{peak}: training stopped and no LoRA was "
        f"saved; {where}. To fit: close other programs and notebooks that use the GPU (nvidia-smi lists them); or "
        f"plan for less memory: a smaller preset in notebook 03's form, or in config.json fewer "
        f"train.keep_activations (now {tc.keep_activations}) or a smaller train.batch_size (now {tc.batch_size}; "
        f"raise gradient_accumulation_steps to keep {tc.batch_size * tc.gradient_accumulation_steps} samples per "
        f"step); or smaller images (data.width, data.height). Then {restart}continue with {how_to_resume}.")


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


def optimizer_step(accelerator, wrapped, state: TrainState, data: TrainingData, latent: LatentScale,
                   table: flow.NoiseTable, tc, hw, last: Path | None,
                   how_to_resume: str = guard.RESUME_IN_PYTHON) -> tuple[float, float]:
    """One optimizer step: this process's micro-batches of step `state.step`, forward + backward each, gradients
    all-reduced across processes, clipped, applied. Returns (mean loss of the step's samples over all processes,
    gradient norm)."""
    total, grad_norm = torch.zeros(2, device=accelerator.device), float("nan")
    for micro in data.micro_batches(state.step, accelerator.process_index, hw.device, hw.dtype):
        with accelerator.accumulate(wrapped):  # no all-reduce until the last micro-batch of the step
            loss = training_step(wrapped, micro.batch, table, tc, latent, micro.generators, hw.dtype)
            value = loss.item()
            if not bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):  # on any process
                what = value if not math.isfinite(value) else "non-finite on another process"
                raise _diverged(f"the loss became {what}", state.step, last, hw, how_to_resume)
            accelerator.backward(micro.scale * loss)  # every sample of the step weighs the same (MicroBatch)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(state.params, tc.max_grad_norm).item()
                state.skipped = state.skipped + 1 if not math.isfinite(grad_norm) else 0  # fp16: the scaler skips
                if state.skipped and (state.scaler is None or state.skipped > MAX_SKIPPED_FP16_STEPS):
                    raise _diverged(f"the gradient norm became {grad_norm}", state.step, last, hw, how_to_resume)
            state.optimizer.step()  # a no-op before the last micro-batch (accelerate)
            if accelerator.sync_gradients and not state.optimizer.step_was_skipped:
                state.schedule.step()  # once per optimizer step, whatever the number of processes
            state.optimizer.zero_grad(set_to_none=True)
        samples = len(micro.ids) if micro.scale else 0
        total += torch.stack([loss.detach().float() * samples, torch.tensor(float(samples), device=total.device)])
    total = accelerator.reduce(total, "sum")  # (sum of per-sample losses, samples) over every process
    state.step += 1
    return (total[0] / total[1]).item(), grad_norm


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
    from accelerate import Accelerator, PartialState

    # Everything that can fail is checked before --overwrite deletes anything (fluxnb.train.guard).
    if max_steps is not None:
        run.config = run.config.replace(train={"max_train_steps": max_steps})  # validated here, saved below
    guard.check_inputs(run)
    start = guard.start_point(run, resume, overwrite)
    guard.check_resumable(run, start)
    cfg, hw, tc = run.config, run.hw, run.config.train
    if start is not None and start.step >= tc.max_train_steps and run.dir.lora_file.is_file():
        return _already_trained(run, start)
    live = in_notebook() if live is None else live
    processes = PartialState(cpu=hw.device.type == "cpu").num_processes  # > 1 under `accelerate launch`
    latent, table, scheduler = load_scales(run)
    val = validation.Validation(run, table, latent, MetricsLog(run.dir.metrics).read(), start.step if start else 0)
    print(f"fluxnb: {val.note}")
    data = TrainingData(run.dir, tc.batch_size, tc.seed, accumulation=tc.gradient_accumulation_steps,
                        processes=processes, only=val.train_ids)  # never a held-out image
    trained_on = guard.data_fingerprint(run)  # recorded in every checkpoint: resume refuses other data
    sampler = make_sampler(run, scheduler)

    with cpu_threads(hw), speed.attention_backends(hw, cfg.model.quantization):
        model = transformer if transformer is not None else prepare_transformer(run)
        accelerator = Accelerator(mixed_precision=MIXED_PRECISION[hw.dtype], cpu=hw.device.type == "cpu",
                                  gradient_accumulation_steps=tc.gradient_accumulation_steps)
        main = accelerator.is_main_process  # the one process that writes: metrics, grids, checkpoints, the LoRA

        def on_main(fn, *args):  # the others wait, so that no process runs ahead into the next all-reduce
            out = fn(*args) if main else None
            accelerator.wait_for_everyone()
            return out

        wrapped = accelerator.prepare(model)  # autocast around the forward; DistributedDataParallel on several GPUs
        speed.prepare(model, cfg.model, tc, hw, verbose=main)  # checkpointing, block offload, compiled blocks
        state = TrainState.create(model, tc, accelerator)
        if overwrite:
            on_main(guard.clear_previous, run)  # last, once the data, the model and the LoRA all loaded
        if max_steps is not None:
            on_main(run.save)
        if start is not None:
            checkpoint.restore(start, state)
            accelerator.print(f"fluxnb: resuming from {start.path} (step {state.step} of {tc.max_train_steps})")
        history = MetricsLog(run.dir.metrics).truncate(state.step) if main else []
        accelerator.print(memory.report(f"memory after loading ({hw.describe()})"))

        def save_checkpoint(loss: float) -> Path:
            info = {"loss": loss, "lr": state.lr, **trained_on}
            if (v := val.at(state.step)) is not None:
                info["val_loss"] = v
            return checkpoint.save(run.dir, cfg, state, info=info, keep=tc.keep_checkpoints).path

        target = tc.max_train_steps if stop_after is None else min(stop_after, tc.max_train_steps)
        newest = checkpoint.latest(run.dir)
        result = TrainResult(state.step, None, newest.path if newest else None)
        fixed_loss = lambda: evaluate(model, data, table, tc, latent, hw, autocast=accelerator.autocast)  # noqa: E731
        result.train_loss_before = on_main(fixed_loss)
        if sampler is not None and state.step == 0:  # the base model's images, to compare the later grids with
            on_main(sampler.grid, model, 0, live)
        progress = Progress(run.dir, tc.max_train_steps, state.step, history, live) if main else None
        if hw.device.type == "cuda":  # the budget check after the first step measures steps, not the model's load
            torch.cuda.reset_peak_memory_stats(hw.device)
        began = time.perf_counter()
        wrapped.train()
        try:
            while state.step < target:
                guard.check_interrupted()
                try:
                    loss, grad_norm = optimizer_step(accelerator, wrapped, state, data, latent, table, tc, hw,
                                                     result.checkpoint, how_to_resume)
                except torch.OutOfMemoryError as err:  # the step's own memory; grids and checkpoints are not this
                    newest = checkpoint.latest(run.dir)
                    raise _out_of_memory(state.step, newest.path if newest else None, tc, hw, how_to_resume) from err
                if state.step == result.step + 1:  # this call's first step measured the peak: fit the budget once
                    fitted = speed.fit_budget(model, cfg.model, tc, hw, tokens_per_sample(
                        cfg.data.width, cfg.data.height, cfg.data.max_sequence_length))
                    tc = fitted[1] if fitted else tc  # the settings in force from here on (messages name them)
                result.losses.append(loss)
                if main:
                    row = {"step": state.step, "loss": loss, "lr": state.lr, "grad_norm": grad_norm,
                           "epoch": (state.step - 1) // data.steps_per_epoch,
                           "seconds": round(time.perf_counter() - began, 3)}
                    row |= {k: round(v, 3) for k, v in memory.snapshot().items() if k.startswith("gpu_peak")}
                    if val.due(state.step, target):  # held-out loss at fixed noise, beside the training loss
                        row["val_loss"] = val.loss(model, state.step, accelerator.autocast)
                    MetricsLog(run.dir.metrics).append(row)
                    progress.update(row)
                accelerator.wait_for_everyone()  # the held-out loss is the main process's alone
                at_checkpoint = tc.checkpoint_every and state.step % tc.checkpoint_every == 0
                if sampler and (state.step % tc.sample_every == 0 or at_checkpoint):  # a grid per checkpoint
                    on_main(sampler.grid, model, state.step, live)
                if at_checkpoint:
                    result.checkpoint = on_main(save_checkpoint, loss)
        except KeyboardInterrupt:
            result.interrupted = True
            newest = checkpoint.latest(run.dir)  # from disk: Ctrl-C may land in save() after its rename
            result.checkpoint = newest.path if newest else None
            where = f"from {newest.path} (step {newest.step})" if newest else "from step 0 (no checkpoint yet)"
            print(f"\nfluxnb: interrupted at step {state.step}; to continue {where}: {how_to_resume}")
        finally:
            if progress is not None:
                progress.close()
        result.step, result.seconds = state.step, time.perf_counter() - began
        if result.interrupted:
            return result
        if checkpoint.latest(run.dir) is None or checkpoint.latest(run.dir).step != state.step:
            result.checkpoint = on_main(save_checkpoint, result.losses[-1] if result.losses else float("nan"))
        result.train_loss_after = on_main(fixed_loss)
        if main:
            print(f"fluxnb: training-set loss (fixed noise, {min(16, len(data))} samples): "
                  f"{result.train_loss_before:.4f} -> {result.train_loss_after:.4f}")
        if state.step >= tc.max_train_steps:
            if main:  # kept with the last checkpoint, so a later call on this finished run can report them
                checkpoint.annotate(checkpoint.latest(run.dir), train_loss_before=result.train_loss_before,
                                    train_loss_after=result.train_loss_after, train_seconds=round(result.seconds, 1))
            result.lora = on_main(lora.save_lora, model, run.dir.lora)
            accelerator.print(f"fluxnb: LoRA saved to {result.lora}")
        result.best_checkpoint = getattr(checkpoint.best(run.dir), "path", None)
        accelerator.print(validation.summary(run.dir))
        accelerator.print(memory.report("memory at the end"))
    return result
