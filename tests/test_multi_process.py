"""Training on several processes (accelerate launch, DDP) gives the LoRA of one process with the same global batch.

Every random draw of a sample (latent, noise, timestep) depends on the seed, the optimizer step and the sample
alone (fluxnb.train.batches.sample_generator), each optimizer step's group of samples is fixed by the seed and
the step, and each sample weighs the same in the step's gradient whatever the split: so 2 processes x batch 2,
1 process x batch 2 x accumulation 2 and 1 process x batch 4 are the same run, up to floating-point summation
order (gradients are averaged by an all-reduce instead of inside one batch).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxnb.train import train
from train_helpers import make_run

ROOT = Path(__file__).resolve().parents[1]
# Adam's epsilon well above the tiny model's smallest gradients: there m / sqrt(v) would magnify float rounding of
# those gradients into whole update steps (3.5e-5 of the weights with the default 1e-8, measured; 1.7e-6 with
# 1e-3), a property of Adam on a random tiny model, not of how the samples are split. Both runs use it alike.
STEPS = {"max_train_steps": 5, "sample_every": 0, "checkpoint_every": 0, "optimizer": "adamw", "adam_epsilon": 1e-3}
# max |difference| / max |weight| of the LoRA after 5 AdamW steps: float summation order only (1.7e-6 measured,
# 60x under this); another seed differs by far more than 100x this (asserted below).
TOLERANCE = 1e-4


def lora_of(run) -> dict[str, torch.Tensor]:
    return load_file(run.dir.lora_file)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() / b[k].abs().max().clamp_min(1e-12).item() for k in a)


def one_process(tmp_path, tmp_path_factory, name, **train_cfg):
    run = make_run(tmp_path / name, tmp_path_factory, train={**STEPS, **train_cfg})
    train(run, live=False)
    return run


def test_the_split_into_micro_batches_does_not_change_the_run(tmp_path, tmp_path_factory):
    whole = one_process(tmp_path, tmp_path_factory, "b4", batch_size=4, gradient_accumulation_steps=1)
    split = one_process(tmp_path, tmp_path_factory, "b2x2", batch_size=2, gradient_accumulation_steps=2)
    assert relative_difference(lora_of(split), lora_of(whole)) < TOLERANCE
    other_seed = one_process(tmp_path, tmp_path_factory, "seed1", batch_size=4, seed=1)
    assert relative_difference(lora_of(other_seed), lora_of(whole)) > 100 * TOLERANCE  # the check can fail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(run, *args: str) -> None:
    """`accelerate launch --num_processes 2 -m fluxnb train --run-dir RUN` on the CPU (gloo)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA fluxnb asks for gloo on the CPU.
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(_free_port()), "-m", "fluxnb", "train", "--run-dir",
                          str(run.dir.root), *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_two_processes_train_the_one_process_lora_and_resume_it(tmp_path, tmp_path_factory):
    whole = one_process(tmp_path, tmp_path_factory, "one", batch_size=4, gradient_accumulation_steps=1)
    two = make_run(tmp_path / "two", tmp_path_factory, train={**STEPS, "batch_size": 2})
    launch_two(two)
    assert relative_difference(lora_of(two), lora_of(whole)) < TOLERANCE
    metrics = [line for line in two.dir.metrics.read_text().splitlines() if line.strip()]
    assert len(metrics) == STEPS["max_train_steps"]  # one writer: no interleaved lines from the second process

    # 3 steps on one process (global batch 4), the rest resumed on two processes x batch 2 (global batch 4).
    moved = make_run(tmp_path / "moved", tmp_path_factory, train={**STEPS, "batch_size": 4, "checkpoint_every": 3})
    train(moved, stop_after=3, live=False)
    moved.config = moved.config.replace(train={"batch_size": 2})
    moved.save()
    launch_two(moved, "--resume")
    assert relative_difference(lora_of(moved), lora_of(whole)) < TOLERANCE
