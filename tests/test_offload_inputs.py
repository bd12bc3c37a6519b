"""benchmarks/offload_inputs.py (issue 25's item 2, measured on the GPU before it is built into fluxnb): on the CPU,
what it moves out of a compiled, checkpointed FLUX step, and that the step's numbers do not change."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from model_helpers import HW, grads, loss, model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import offload_inputs  # noqa: E402

from fluxnb.config import ModelConfig, TrainConfig
from fluxnb.train import speed


class Offloading(offload_inputs.InputsToCPU):
    """The hooks active for the whole step (what benchmarks/train_step.py wraps is the forward; the tiny test
    model's forward and loss are one call), with a record of what was unpacked."""

    def __init__(self, **kwargs):
        super().__init__(device_type="cpu", **kwargs)
        self.unpacked = 0

    def unpack(self, saved):
        self.unpacked += isinstance(saved, offload_inputs._Saved)
        return super().unpack(saved)


def test_a_compiled_step_moves_only_its_blocks_inputs_and_keeps_its_numbers(tiny_assets):
    plain, moved = model(str(tiny_assets.model)), model(str(tiny_assets.model))
    for transformer in (plain, moved):
        speed.configure(transformer, ModelConfig(), TrainConfig(compile="on"), HW, verbose=False)
    expected = loss(plain, 0)
    expected.backward()
    hidden = (1, 24, 32)  # a block's image tokens: batch 1, 24 tokens, the tiny model's width (float32)
    hooks = Offloading(min_bytes=24 * 32 * 4)  # what moves at full size is the hidden states, nothing smaller
    with hooks:
        got = loss(moved, 0)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    want, have = grads(plain), grads(moved)
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)
    # Each of the three compiled blocks' hidden states moved, and every tensor that moved came back once.
    assert hooks.moved.count(hidden) >= len(list(moved.transformer_blocks) + list(moved.single_transformer_blocks))
    assert hooks.unpacked == len(hooks.moved)


def test_small_tensors_and_parameters_stay_where_they_are():
    hooks = offload_inputs.InputsToCPU(min_bytes=1024, device_type="cpu")
    small, weight, big = torch.zeros(8), torch.nn.Parameter(torch.zeros(1024)), torch.arange(1024.0)
    assert hooks.pack(small) is small and hooks.pack(weight) is weight
    first = hooks.pack(big)
    second = hooks.pack(big * 2)
    assert second.previous is first and hooks.moved == [(1024,), (1024,)]
    torch.testing.assert_close(hooks.unpack(second), big * 2)
    assert first.fetched is not None  # fetched ahead, as the one the backward pass needs next
    torch.testing.assert_close(hooks.unpack(first), big)
    torch.testing.assert_close(hooks.unpack(first), big)  # a second backward through a retained graph
