"""Everything that decides the rest of a training run, in one object that saves and restores itself.

    state = TrainState.create(transformer, run.config.train, accelerator)
    state.state_dict()            # optimizer, LR schedule, fp16 loss scale, RNGs, counters (not the LoRA)
    state.load_state_dict(saved)  # ... back where they came from: the run continues exactly

The LoRA weights travel separately, as a stock diffusers LoRA file (fluxnb.model.lora): a checkpoint's LoRA is
then usable for inference as it is (fluxnb.train.checkpoint writes both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
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
        return cls(model, optimizer, schedule, accelerator.scaler)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
