"""fluxnb.offload: streamed blocks give the same loss and LoRA gradients as resident ones, and really leave memory.

On the CPU the "offload" copies between two CPU buffers without CUDA streams; what is tested is the schedule:
every frozen weight is present whenever forward, the checkpoint's re-run or backward reads it, and emptied
otherwise. (Overlap on a CUDA stream and the GPU memory saved are measured by benchmarks/train_step.py.)
"""

import pytest
import torch
from model_helpers import grads, loss, model

from fluxnb.train import offload


def _frozen_bytes(block):
    return sum(t.untyped_storage().nbytes() for t in offload._frozen_tensors(block))


@pytest.mark.parametrize("count,double_quant", [(99, False), (1, True)])
def test_streamed_blocks_train_exactly_like_resident_ones(tiny_assets, count, double_quant):
    model_id = str(tiny_assets.model)
    plain, streamed = model(model_id, double_quant), model(model_id, double_quant)
    blocks = offload.transformer_blocks(streamed)
    resident_bytes = [_frozen_bytes(b) for b in blocks]
    streamer = offload.stream_blocks(streamed, count)
    chosen = sorted(streamer.parts)
    assert len(chosen) == min(count, len(blocks)) and streamer.offloaded_bytes > 0

    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    streamed_opt = torch.optim.AdamW([p for p in streamed.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # the second step checks the LoRA updates survived streaming
        expected, got = loss(plain, step), loss(streamed, step)
        assert [_frozen_bytes(blocks[i]) for i in chosen] == [0] * len(chosen)  # gone between forward and backward
        expected.backward()
        got.backward()
        assert torch.equal(got, expected)
        want, have = grads(plain), grads(streamed)
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=0, atol=0, msg=name)
        plain_opt.step(), streamed_opt.step()
        plain_opt.zero_grad(), streamed_opt.zero_grad()

    with torch.no_grad():  # inference (the sample grids) streams too, and releases behind itself
        torch.testing.assert_close(loss(streamed, 5), loss(plain, 5), rtol=0, atol=0)
    assert all(_frozen_bytes(blocks[i]) == 0 for i in chosen)
    streamer.remove()
    assert [_frozen_bytes(b) for b in blocks] == resident_bytes
    torch.testing.assert_close(loss(streamed, 7), loss(plain, 7), rtol=0, atol=0)


def test_pick_blocks_spreads_the_offloaded_ones():
    assert offload.pick_blocks(57, 0) == []
    assert offload.pick_blocks(57, 57) == list(range(57)) == offload.pick_blocks(57, 100)
    picked = offload.pick_blocks(57, 10)
    assert len(picked) == 10 and max(b - a for a, b in zip(picked, picked[1:])) <= 6
