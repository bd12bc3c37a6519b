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


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The model being trained and what moves with it: optimizer, LR schedule, fp16 loss scaler, the RNG of
    every draw of training_step (noise, timesteps, latent samples), and the counters. `micro` (micro-batches
    seen) fixes the data order (fluxnb.train.batches); `step` counts optimizer steps."""

    model: torch.nn.Module  # the transformer with its LoRA (not wrapped by accelerate)
    optimizer: torch.optim.Optimizer
    schedule: Any  # a torch LR scheduler, as accelerate prepared it
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    generator: torch.Generator
    step: int = 0
    micro: int = 0

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: TrainConfig, accelerator) -> TrainState:
        """Optimizer over the LoRA weights (fp32) and the LR schedule, prepared by `accelerator`; RNG seeded."""
        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
        optimizer, schedule = accelerator.prepare(optimizer, schedule)
        return cls(model, optimizer, schedule, accelerator.scaler, torch.Generator().manual_seed(cfg.seed))

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(self.generator), "step": self.step, "micro_step": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.generator)
        self.step, self.micro = state["step"], state["micro_step"]
