"""Everything that decides the rest of a training run, in one object that saves and restores itself.

    state = TrainState.create(transformer, run.config.train, accelerator)
    state.state_dict()            # optimizer, LR schedule, fp16 loss scale, RNGs, counters (not the LoRA)
    state.load_state_dict(saved)  # ... back where they came from: the run continues exactly
    with state.averaged(): ...    # the EMA of the LoRA weights in the model (train.ema_decay > 0), then back

The LoRA weights travel separately, as a stock diffusers LoRA file (fluxnb.model.lora): a checkpoint's LoRA is
then usable for inference as it is (fluxnb.train.checkpoint writes both).

EMA (train.ema_decay > 0): diffusers' EMAModel keeps an fp32 average of the LoRA weights, updated after each
optimizer step: e = d * e + (1 - d) * w, with d = 0 at the first update (it copies the weights), then
d = min(ema_decay, n / (9 + n)) at the n-th (diffusers' warm-up: early updates follow the weights closely). Like ai-toolkit, SimpleTuner and OneTrainer, what a run shows
and saves is the average: sample grids, validation and fixed-noise losses, the LoRA file of every checkpoint and
the final one (`averaged`). The weights being trained, which the run continues from, go into the state with the
average itself (its weights, update count, decay): a resume continues both exactly. The average lives on the GPU
when its fp32 copy takes at most 2% of the memory budget (the blog's rank 4: 19 MB), else in CPU RAM
(fluxnb.train.budget.ema_on_gpu), where each update first copies the weights over.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from .budget import GiB, ema_on_gpu
from .step import make_optimizer


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The model being trained and what moves with it: optimizer, LR schedule, fp16 loss scaler, torch's global
    RNG (LoRA dropout) and the optimizer step. The step alone fixes the rest: which samples come next and every
    random draw of training_step (fluxnb.train.batches: seeded by seed, step and sample)."""

    model: torch.nn.Module  # the transformer with its LoRA (not wrapped by accelerate)
    optimizer: torch.optim.Optimizer
    schedule: Any  # a torch LR scheduler, as accelerate prepared it
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    step: int = 0
    skipped: int = 0  # optimizer steps skipped in a row by the fp16 loss scaler (inf gradients); not saved
    ema: Any = None  # diffusers' EMAModel of the LoRA weights, when train.ema_decay > 0

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: TrainConfig, accelerator) -> TrainState:
        """Optimizer over the LoRA weights (fp32), prepared by `accelerator`, and the LR schedule.

        The schedule is not handed to accelerate, which would step it once per process: the training loop steps
        it once per optimizer step, so max_train_steps and warmup mean the same on 1 GPU or 8 (and on resume
        with another number of processes)."""
        from diffusers.optimization import get_scheduler

        optimizer = accelerator.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad], cfg))
        schedule = get_scheduler(cfg.lr_scheduler, optimizer.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
        state = cls(model, optimizer, schedule, accelerator.scaler)
        if cfg.ema_decay:
            state.ema = new_ema(state.params, cfg.ema_decay, cfg.memory_budget_gib)
        return state

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def update_ema(self) -> None:
        """One EMA update from the weights just stepped (a no-op without EMA)."""
        if self.ema is None:
            return
        params, home = self.params, self.ema.shadow_params[0].device
        if params and params[0].device != home:  # an average in CPU RAM: the weights go to it
            params = [p.detach().to(home).requires_grad_(p.requires_grad) for p in params]
        self.ema.step(params)

    @contextlib.contextmanager
    def averaged(self):
        """The EMA weights in the model while the block runs, the trained ones back after it, bit for bit."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "rng": rng_state(), "step": self.step}
        if self.ema is not None:  # the checkpoint's LoRA file holds the average: the trained weights go here
            state |= {"ema": self.ema.state_dict(), "lora": [p.detach().cpu().clone() for p in self.params]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if "lora" in state:  # saved with EMA on: the weights being trained (the LoRA file held the average)
            with torch.no_grad():
                for p, saved in zip(self.params, state["lora"], strict=True):
                    p.copy_(saved)
        if self.ema is not None:
            self._load_ema(state.get("ema"))

    def _load_ema(self, saved: dict[str, Any] | None) -> None:
        """The saved average where there is one (its weights, update count; the config's decay); else, EMA being
        switched on for a resumed run, a new average of the weights restored."""
        home, decay = self.ema.shadow_params[0].device, self.ema.decay
        if saved is None:
            print(f"fluxnb: the checkpoint has no EMA of the LoRA weights: the average (decay {decay}) starts at "
                  f"step {self.step}.")
            self.ema = new_ema(self.params, decay, on=home)
            return
        self.ema.load_state_dict(saved)
        self.ema.to(home)
        self.ema.decay = decay  # train.ema_decay as the config says now (a change is reported when resuming)


def new_ema(params: list[torch.nn.Parameter], decay: float, budget_gib: float = 0.0, *, on: torch.device | None = None):
    """diffusers' EMAModel of `params` in fp32: on their GPU while that costs at most 2% of the memory budget (or of
    the GPU's memory when nothing was planned), else in CPU RAM."""
    from diffusers.training_utils import EMAModel

    device = params[0].device if params else torch.device("cpu")
    if on is None and device.type == "cuda":
        budget = budget_gib or torch.cuda.get_device_properties(device).total_memory / GiB
        on = device if ema_on_gpu(sum(p.numel() for p in params), budget) else torch.device("cpu")
    on = on or device
    return EMAModel([p.detach().to(on, torch.float32) for p in params], decay=decay, foreach=on.type == "cuda")
