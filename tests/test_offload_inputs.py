"""benchmarks/offload_inputs.py (issue 25's item 2, measured on the GPU before it is built into fluxnb): on the CPU,
what it moves out of a compiled, checkpointed FLUX step, and that the step's numbers do not change."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from model_helpers import HW, grads, loss, model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import offload_inputs  # noqa: E402

from fluxnb.config import ModelConfig, TrainConfig
from fluxnb.train import speed


@pytest.fixture(autouse=True)
def fresh_compiler():
    """These tests compile the tiny blocks; the graphs they leave would be reused by later tests that count theirs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Offloading(offload_inputs.InputsToCPU):
    """On the CPU, with a record of what was unpacked."""

    def __init__(self, **kwargs):
        super().__init__(device_type="cpu", **kwargs)
        self.unpacked = 0

    def unpack(self, saved):
        self.unpacked += isinstance(saved, offload_inputs._Saved)
        return super().unpack(saved)


def _step(tiny_assets, min_bytes: int, ahead_bytes: int = 256 << 20, batch: int = 1):
    """The tiny model's loss and LoRA gradients, compiled as fluxnb trains it, plain and with the hooks around the
    forward; returns both and the hooks."""
    plain, moved = model(str(tiny_assets.model)), model(str(tiny_assets.model))
    for transformer in (plain, moved):
        speed.configure(transformer, ModelConfig(), TrainConfig(compile="on"), HW, verbose=False)
    expected = loss(plain, 0, batch)
    expected.backward()
    hooks = Offloading(min_bytes=min_bytes, ahead_bytes=ahead_bytes)
    with hooks:
        got = loss(moved, 0, batch)
    got.backward()
    return (expected, grads(plain)), (got, grads(moved)), hooks, moved


def assert_same(want, have) -> None:
    torch.testing.assert_close(have[0], want[0], rtol=1e-6, atol=0)
    assert want[1].keys() == have[1].keys()
    for name in want[1]:
        torch.testing.assert_close(have[1][name], want[1][name], rtol=1e-5, atol=1e-7)


def test_a_compiled_step_moves_its_blocks_hidden_states_and_keeps_its_numbers(tiny_assets):
    hidden = (1, 24, 32)  # a block's image tokens: batch 1, 24 tokens, the tiny model's width (float32)
    want, have, hooks, moved = _step(tiny_assets, min_bytes=24 * 32 * 4)  # at full size: the hidden states
    assert_same(want, have)
    blocks = len(moved.transformer_blocks) + len(moved.single_transformer_blocks)
    assert hooks.moved.count(hidden) >= blocks
    assert hooks.unpacked == hooks.fetches == len(hooks.moved)  # each came back once


def test_nodes_saving_several_tensors_fetch_each_once_and_leave_nothing_behind(tiny_assets):
    """Down to the text tokens (1, 7, 32), blocks save two tensors or more that move; one is unpacked after the
    other, and must not be fetched again (a copy nobody takes would stay on the GPU). And only a few at a time."""
    want, have, hooks, _ = _step(tiny_assets, min_bytes=7 * 32 * 4, ahead_bytes=1)
    assert_same(want, have)
    assert (1, 7, 32) in hooks.moved
    assert hooks.unpacked == hooks.fetches == len(hooks.moved)
    assert hooks.last is None  # the forward's chain is the graph's alone


def test_slices_come_back_with_their_strides_in_batches(tiny_assets):
    """A single-stream block returns its image and text tokens as slices of one tensor, the next block's inputs.
    In a batch of 2 a slice is not dense; a compiled backward checks its inputs' strides, so each must come back
    with its own (the first GPU run, 1024x1024 at batch 2, stopped there). The image tokens' slice moves (its span
    is 15% more than its elements here), the text tokens' (2.7 times) stays."""
    want, have, hooks, _ = _step(tiny_assets, min_bytes=1, batch=2)
    assert_same(want, have)
    assert (2, 24, 32) in hooks.moved and (2, 7, 32) in hooks.moved  # dense ones (a double-stream block's)
    assert hooks.unpacked == hooks.fetches == len(hooks.moved)
    whole = torch.arange(2 * 31 * 32.0).reshape(2, 31, 32)
    image, text = whole[:, 7:], whole[:, :7]
    packer = offload_inputs.InputsToCPU(min_bytes=1, device_type="cpu")
    assert packer.pack(text) is text
    back = packer.unpack(packer.pack(image))
    assert back.stride() == image.stride() and torch.equal(back, image)


def test_weights_small_tensors_and_other_devices_stay_where_they_are():
    hooks = offload_inputs.InputsToCPU(min_bytes=1024, device_type="cpu")
    weight = torch.nn.Parameter(torch.zeros(64, 32))
    small, big = torch.zeros(8), torch.arange(1024.0)
    assert hooks.pack(small) is small and hooks.pack(weight) is weight
    transposed = weight.t()  # what eager F.linear saves
    assert hooks.pack(transposed) is transposed
    assert offload_inputs.InputsToCPU(min_bytes=1, device_type="cuda").pack(big) is big  # on the CPU: not a GPU's
    first = hooks.pack(big)
    second = hooks.pack(big * 2)
    assert second.previous is first and hooks.moved == [(1024,), (1024,)]
    torch.testing.assert_close(hooks.unpack(second), big * 2)
    assert first.fetched is not None  # fetched ahead, as the one the backward pass needs next
    torch.testing.assert_close(hooks.unpack(first), big)
    torch.testing.assert_close(hooks.unpack(first), big)  # a second backward through a retained graph
    assert hooks.fetches == 3
