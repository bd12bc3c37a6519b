"""The QLoRA training loop: NF4 FLUX transformer + LoRA, trained on the cached latents and text embeddings.

    result = train(run)                      # notebook 03, or `python -m fluxnb train --run-dir RUN`

Only the transformer is on the GPU: the text encoders ran once in notebook 01 (embeddings/), the VAE once in
notebook 02 (latents/) and waits on the CPU to decode sample grids. One optimizer step = processes x accumulation x
micro-batch, each micro-batch one `training_step` (fluxnb.train.step, the math in fluxnb.train.flow). Every
`checkpoint_every` steps the TrainState goes to checkpoints/step-N (fluxnb.train.checkpoint): `train(run,
resume=True)` replays the run from there exactly. At the end: RUN/lora/pytorch_lora_weights.safetensors, for
stock `FluxPipeline.load_lora_weights` (with train.ema_decay > 0: the EMA of the weights, fluxnb.train.state).
What the loop sets up and says lives beside it (fluxnb.train.session).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..base import memory
from ..base.interrupts import check_interrupted, interrupt_handled, watching_interrupts
from ..config import RunConfig
from ..data.store import read_samples
from ..model import lora
from ..run import Run, writes
from . import checkpoint, guard, speed, validation
from .monitor import in_notebook
from .session import Session, cpu_threads, interrupted


@dataclass
class TrainResult:
    step: int  # optimizer steps done so far in this run directory
    lora: Path | None  # RUN/lora/pytorch_lora_weights.safetensors, once max_train_steps is reached
    checkpoint: Path | None  # the newest checkpoint
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    train_loss_before: float | None = None  # fixed-noise training-set loss (fluxnb.train.step.evaluate)
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


@watching_interrupts  # a Ctrl-C is never lost, not even one swallowed by a __del__ (taking the lock, too)
@writes("train")  # the run's lock, for the whole call (fluxnb.run.lock)
def train(run: Run, *, transformer=None, resume: bool = True, overwrite: bool = False, max_steps: int | None = None,
          settings: dict | None = None, stop_after: int | None = None, live: bool | None = None,
          how_to_resume: str = guard.RESUME_IN_PYTHON) -> TrainResult:
    """Train (or continue training) the LoRA of `run`; see the module docstring.

    transformer: a model already loaded for training (`load_for_training`), else it is built here. max_steps: a
    new total for train.max_train_steps; settings: other train.* values (the CLI's options); both are saved to
    config.json once every check passed. stop_after: pause after this optimizer step (a checkpoint is written;
    the LR schedule still aims at max_train_steps). live: redraw plots in a notebook. how_to_resume: what a
    stopped run tells the user to type (the CLI's own command line).
    """
    # Setup. Everything that can fail is checked before --overwrite deletes anything (fluxnb.train.guard).
    changes = (settings or {}) | ({"max_train_steps": max_steps} if max_steps is not None else {})
    run.config = run.config.replace(train=changes) if changes else run.config  # validated here, saved below
    # Settings changed since config.json was written (these, the CLI's --lora-type): saved once checks passed.
    edited = run.dir.config.is_file() and RunConfig.load(run.dir.root) != run.config
    samples = read_samples(run.dir)  # samples.jsonl, read once for every check and the training data
    guard.check_inputs(run, samples)
    start = guard.start_point(run, resume, overwrite)
    guard.check_resumable(run, start, samples)
    tc = run.config.train
    if start is not None and start.step >= tc.max_train_steps and run.dir.lora_file.is_file():
        return _already_trained(run, start)
    live = in_notebook() if live is None else live
    target = tc.max_train_steps if stop_after is None else min(stop_after, tc.max_train_steps)
    with cpu_threads(run.hw), speed.attention_backends(run.hw, run.config.model.quantization):
        s = Session(run, transformer, start, samples, overwrite=overwrite, save_config=edited,
                    live=live, how_to_resume=how_to_resume)
        result = TrainResult(s.state.step, None, s.newest_path, train_loss_before=s.on_main(s.fixed_loss))
        if s.state.step == 0:
            s.grid(0)  # the base model's images, to compare the later grids with
        began = s.start()
        try:
            # The loop: one optimizer step, its log line (and held-out loss), a sample grid, a checkpoint.
            while s.state.step < target:
                check_interrupted()
                loss, grad_norm = s.optimizer_step()
                result.losses.append(loss)
                s.log(loss, grad_norm, target)
                at = s.state.step
                at_checkpoint = tc.checkpoint_every and at % tc.checkpoint_every == 0
                if tc.sample_every and (at % tc.sample_every == 0 or at_checkpoint):  # and a grid per checkpoint
                    s.grid(at)
                if at_checkpoint:
                    result.checkpoint = s.save_checkpoint(loss)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            s.close()
        result.step, result.seconds = s.state.step, time.perf_counter() - began
        try:  # the end (a last checkpoint, the LoRA, the summary) stops on a Ctrl-C as the loop does
            if not result.interrupted:
                _finish(s, result)
                check_interrupted()  # one a __del__ swallowed while finishing
        except KeyboardInterrupt:
            result.interrupted = True
        if result.interrupted:  # answered here: where the run stands and how to continue; nothing is lost
            interrupt_handled()
            result.checkpoint = interrupted(run, s.state.step, how_to_resume)
        return result


def _finish(s: Session, result: TrainResult) -> TrainResult:
    """The end: a checkpoint of the last step, the fixed-noise loss after it, the LoRA once max_train_steps is
    reached, and which checkpoint is best by validation loss."""
    run, state = s.run, s.state
    if s.newest is None or s.newest.step != state.step:
        result.checkpoint = s.save_checkpoint(result.losses[-1] if result.losses else float("nan"))
    result.train_loss_after = s.on_main(s.fixed_loss)
    if s.main:
        print(f"fluxnb: training-set loss (fixed noise, {min(16, len(s.data))} samples): "
              f"{result.train_loss_before:.4f} -> {result.train_loss_after:.4f}")
    if state.step >= run.config.train.max_train_steps:
        if s.main:  # kept with the last checkpoint, so a later call on this finished run can report them
            checkpoint.annotate(s.newest, train_loss_before=result.train_loss_before,
                                train_loss_after=result.train_loss_after, train_seconds=round(result.seconds, 1))
        with state.averaged():  # train.ema_decay > 0: the EMA of the weights is the run's LoRA
            result.lora = s.on_main(lora.save_lora, s.model, run.dir.lora)
        s.accelerator.print(f"fluxnb: LoRA saved to {result.lora}")
    best = checkpoint.best(run.dir)
    result.best_checkpoint = best.path if best else None
    s.accelerator.print(validation.summary(run.dir, best))
    s.accelerator.print(memory.report("memory at the end"))
    return result


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
