"""What `train` sets up and says, beside the loop: the model, data and accelerator of one training call, the
messages a stopped run gives, and the details of several processes (only the main one writes; the others wait).

    session = Session(run, transformer, start, samples, overwrite=False, live=False, how_to_resume=...)
    loss, grad_norm = session.optimizer_step()   # fluxnb.train.step.optimizer_step; its failures as one message
    session.log(loss, grad_norm)                 # metrics.jsonl, the progress bar, the held-out loss when due
    session.save_checkpoint(loss)                # the main process writes it; every process waits for it
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..base import memory
from ..base.errors import FluxnbError
from ..base.hub_errors import hub_errors
from ..data import latents
from ..model import lora
from ..model.quant import load_transformer
from ..run import Run
from ..run.records import MetricsLog
from . import checkpoint, flow, guard, speed, step, validation
from .batches import TrainingData
from .budget import tokens_per_sample
from .monitor import Progress, ValidationSampler, in_notebook
from .state import TrainState

MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}  # accelerate's names


class TrainingDiverged(FluxnbError, FloatingPointError):
    """The loss or the gradients stopped being finite numbers; nothing broken was saved."""


class TrainingOutOfMemory(FluxnbError, torch.OutOfMemoryError):
    """The GPU ran out of memory during training: what to change, and where the run stands."""


class Session:
    """One `train` call's model, data, accelerator and training state, set up in this order: the data and the
    scales (cheap, and what fails first), the model, then --overwrite's deletion, then the resumed state."""

    def __init__(self, run: Run, transformer, start: checkpoint.Checkpoint | None, samples: list, *,
                 overwrite: bool, save_config: bool, live: bool, how_to_resume: str) -> None:
        from accelerate import Accelerator, PartialState

        cfg, hw = run.config, run.hw
        self.run, self.tc, self.live, self.how_to_resume = run, cfg.train, live, how_to_resume
        processes = PartialState(cpu=hw.device.type == "cpu").num_processes  # > 1 under `accelerate launch`
        self.latent, self.table, scheduler = load_scales(run)
        history = MetricsLog(run.dir.metrics).read()
        self.val = validation.Validation(run, self.table, self.latent, history, start.step if start else 0, samples)
        print(f"fluxnb: {self.val.note}")
        self.data = TrainingData(run.dir, self.tc.batch_size, self.tc.seed, accumulation=self.tc.gradient_accumulation_steps,
                                 processes=processes, only=self.val.train_ids, samples=samples,  # no held-out image
                                 caption_dropout=self.tc.caption_dropout)
        self.trained_on = guard.data_fingerprint(run, samples)  # in every checkpoint: resume refuses other data
        self.sampler = make_sampler(run, scheduler)
        self.model = transformer if transformer is not None else load_for_training(run)
        self.accelerator = Accelerator(mixed_precision=MIXED_PRECISION[hw.dtype], cpu=hw.device.type == "cpu",
                                       gradient_accumulation_steps=self.tc.gradient_accumulation_steps)
        self.main = self.accelerator.is_main_process  # the one process that writes: metrics, grids, checkpoints, LoRA
        self.wrapped = self.accelerator.prepare(self.model)  # autocast; DistributedDataParallel on several GPUs
        speed.configure(self.model, cfg.model, self.tc, hw, verbose=self.main)  # checkpointing, offload, compile
        self.state = TrainState.create(self.model, self.tc, self.accelerator)
        if overwrite:
            self.on_main(guard.clear_previous, run)  # last, once the data, the model and the LoRA all loaded
        if save_config:
            self.on_main(run.save)
        if start is not None:
            self.on_main(checkpoint.set_aside, run.dir, start.step)  # the damaged newer ones guard.start_point named
            checkpoint.restore(start, self.state)
            self.accelerator.print(f"fluxnb: resuming from {start.path} (step {self.state.step} of "
                                   f"{self.tc.max_train_steps})")
        self.history = MetricsLog(run.dir.metrics).truncate(self.state.step) if self.main else []
        self.newest = start  # the newest checkpoint this call knows of (it lists checkpoints/ once, in guard)
        self.first_step = self.state.step
        if note := step.optimizer_note(self.tc):  # e.g. prodigy with Adam's learning rate
            self.accelerator.print(f"fluxnb: warning: {note}")
        self.accelerator.print(memory.report(f"memory after loading ({hw.describe()})"))

    def on_main(self, fn, *args):
        """fn(*args) on the main process; the others wait, so none runs ahead into the next all-reduce."""
        out = fn(*args) if self.main else None
        self.accelerator.wait_for_everyone()
        return out

    def fixed_loss(self) -> float:
        with self.state.averaged():  # with EMA on, the average: what the run shows and saves (fluxnb.train.state)
            return step.evaluate(self.model, self.data, self.table, self.tc, self.latent, self.run.hw,
                                 autocast=self.accelerator.autocast)

    def start(self) -> float:
        """The progress bar, and the moment training starts (the budget check measures steps from here)."""
        self.progress = (Progress(self.run.dir, self.tc.max_train_steps, self.state.step, self.history, self.live)
                         if self.main else None)
        if self.run.hw.device.type == "cuda":  # the budget check after the first step measures steps, not the load
            torch.cuda.reset_peak_memory_stats(self.run.hw.device)
        self.began = time.perf_counter()
        return self.began

    def optimizer_step(self) -> tuple[float, float]:
        """fluxnb.train.step.optimizer_step; a divergence or the step's own out-of-memory as one message. After
        this call's first step, the memory plan is held against the measured peak (speed.fit_budget)."""
        hw = self.run.hw
        try:
            out = step.optimizer_step(self.accelerator, self.wrapped, self.state, self.data, self.latent, self.table,
                                      self.tc, hw)
        except step.Diverged as err:
            raise diverged(str(err), self.state.step, self.last_good(), hw, self.how_to_resume) from None
        except torch.OutOfMemoryError as err:  # the step's own memory; grids and checkpoints are not this
            raise out_of_memory(self.state.step, self.last_good(), self.tc, hw, self.how_to_resume) from err
        if self.state.step == self.first_step + 1:
            d = self.run.config.data
            fitted = speed.fit_budget(self.model, self.run.config.model, self.tc, hw,
                                      tokens_per_sample(d.width, d.height, d.max_sequence_length,
                                                        self.run.config.model.kontext))
            self.tc = fitted[1] if fitted else self.tc  # the settings in force from here on (messages name them)
        return out

    def log(self, loss: float, grad_norm: float, target: int) -> None:
        """A row of metrics.jsonl (with the held-out loss when due) and the progress bar, on the main process."""
        s = self.state.step
        if self.main:
            row = {"step": s, "loss": loss, "lr": self.state.lr, "grad_norm": grad_norm,
                   "epoch": (s - 1) // self.data.steps_per_epoch, "seconds": round(time.perf_counter() - self.began, 3)}
            row |= {k: round(v, 3) for k, v in memory.snapshot().items() if k.startswith("gpu_peak")}
            if self.val.due(s, target):  # held-out loss at fixed noise, beside the training loss
                with self.state.averaged():
                    row["val_loss"] = self.val.loss(self.model, s, self.accelerator.autocast)
            MetricsLog(self.run.dir.metrics).append(row)
            self.progress.update(row)
        self.accelerator.wait_for_everyone()  # the held-out loss is the main process's alone

    def grid(self, at: int) -> None:
        if self.sampler is not None:
            with self.state.averaged():  # the same swap on every process, undone before the next step
                self.on_main(self.sampler.grid, self.model, at, self.live)

    @property
    def newest_path(self) -> Path | None:
        return self.newest.path if self.newest is not None else None

    def last_good(self) -> Path | None:
        """The checkpoint a stopped run's message offers: the newest that verifies, read from disk (the one this
        call wrote may have been damaged since, e.g. by a full Drive), the one a resume would take."""
        intact = checkpoint.newest_intact(self.run.dir)[0]
        return intact.path if intact else None

    def save_checkpoint(self, loss: float) -> Path:
        def save() -> checkpoint.Checkpoint:
            info = {"loss": loss, "lr": self.state.lr, **self.trained_on}
            if (v := self.val.at(self.state.step)) is not None:
                info["val_loss"] = v
            return checkpoint.save(self.run.dir, self.run.config, self.state, info=info,
                                   keep=self.tc.keep_checkpoints)

        saved = self.on_main(save)
        self.newest = saved or checkpoint.Checkpoint(self.run.dir.checkpoints / f"step-{self.state.step}",
                                                     self.state.step)  # other processes: what the main one wrote
        return self.newest.path

    def close(self) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.close()


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


def load_for_training(run: Run):
    """Load the transformer as run.config.model says (fluxnb.model.quant) and add the seeded LoRA adapter."""
    transformer = load_transformer(run.config.model, run.hw)
    lora.add_lora(transformer, run.config.lora, seed=run.config.train.seed)
    return transformer


def load_scales(run: Run):
    """The VAE's latent shift/scale and the scheduler's training noise table, from their configs alone (kilobytes),
    and the scheduler (the sample grids reuse it)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    m = run.config.model
    with hub_errors(m.model_id):
        latent = step.LatentScale.from_vae_config(AutoencoderKL.load_config(m.model_id, subfolder="vae",
                                                                            revision=m.revision))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(m.model_id, subfolder="scheduler",
                                                                    revision=m.revision)
    # The table copies the training timesteps before sampling's set_timesteps rewrites the shared scheduler.
    return latent, flow.NoiseTable.from_scheduler(scheduler), scheduler


def make_sampler(run: Run, scheduler) -> ValidationSampler | None:
    """The sample-grid maker (its VAE, 168 MB in bf16, waits on the CPU between grids), or None if never used.
    FLUX.1-Kontext-dev's prompts each edit a control image (data.validation_images, or the training pairs')."""
    cfg, tc = run.config, run.config.train
    if not tc.sample_every:
        return None
    controls = None
    if cfg.model.kontext:
        from ..data.controls import validation_controls

        controls = validation_controls(run)  # one per prompt, already data.width x data.height
    vae = latents.load_vae(cfg.model, replace(run.hw, device=torch.device("cpu")))
    return ValidationSampler(run.dir, cfg.data.validation_prompts, scheduler, vae, run.hw, cfg.data.width,
                             cfg.data.height, tc.sample_steps, seed=tc.seed, controls=controls)


def diverged(what: str, at: int, last: Path | None, hw, how_to_resume: str) -> TrainingDiverged:
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    fp16 = (" On fp16 (T4-class GPUs, no bf16) the usual cause is overflow: set model.dtype='fp32' if memory allows."
            if hw.dtype == torch.float16 else "")
    return TrainingDiverged(f"{what} at optimizer step {at + 1}: training stopped and no LoRA was saved; {where}. "
                            f"Lower train.learning_rate (e.g. halve it) and keep max_grad_norm at 1.0, then continue "
                            f"with {how_to_resume}.{fp16}")


def out_of_memory(at: int, last: Path | None, tc, hw, how_to_resume: str) -> TrainingOutOfMemory:
    where = f"the newest checkpoint is {last}" if last else "no checkpoint was written yet"
    peak = (f" (peak {torch.cuda.max_memory_allocated(hw.device) / 2**30:.1f} GiB allocated)"
            if hw.device.type == "cuda" else "")
    card = f" ({hw.gpu.total_gib:.1f} GiB)" if hw.gpu is not None else ""
    restart = "restart this notebook's kernel (it holds the failed step's memory), then " if in_notebook() else ""
    return TrainingOutOfMemory(
        f"the GPU{card} ran out of memory in optimizer step {at + 1}{peak}: training stopped and no LoRA was "
        f"saved; {where}. To fit: close other programs and notebooks that use the GPU (nvidia-smi lists them); or "
        f"plan for less memory: a smaller preset in notebook 03's form, or in config.json fewer "
        f"train.keep_activations (now {tc.keep_activations}) or a smaller train.batch_size (now {tc.batch_size}; "
        f"raise gradient_accumulation_steps to keep {tc.batch_size * tc.gradient_accumulation_steps} samples per "
        f"step); or smaller images (data.width, data.height). Then {restart}continue with {how_to_resume}.")


def interrupted(run: Run, at: int, how_to_resume: str) -> Path | None:
    """Ctrl-C: say where the run stands and how to continue; the newest checkpoint, read from disk (a Ctrl-C can
    land in checkpoint.save after its rename)."""
    newest = checkpoint.latest(run.dir)
    where = f"from {newest.path} (step {newest.step})" if newest else "from step 0 (no checkpoint yet)"
    print(f"\nfluxnb: interrupted at step {at}; to continue {where}: {how_to_resume}")
    return newest.path if newest else None
