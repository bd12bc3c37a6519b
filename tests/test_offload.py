"""fluxnb.model.offload: streamed blocks give the same loss and LoRA gradients as resident ones, and really leave memory.

On the CPU the "offload" copies between two CPU buffers without CUDA streams; what is tested is the schedule:
every frozen weight is present whenever forward, the checkpoint's re-run or backward reads it, and emptied
otherwise. (Overlap on a CUDA stream and the GPU memory saved are measured by benchmarks/train_step.py.)
"""

import pytest
import torch
from model_helpers import HW, grads, loss, model

from fluxnb.config import ModelConfig, TrainConfig
from fluxnb.model import offload
from fluxnb.train import speed


def _frozen_bytes(block):
    return sum(t.untyped_storage().nbytes() for t in offload._frozen_tensors(block))


@pytest.mark.parametrize("count,double_quant,checkpointing,quantization",
                         [(99, False, "around", "nf4"), (1, True, "around", "nf4"), (99, False, "inside", "nf4"),
                          (99, False, "inside", "fp8")])
def test_streamed_blocks_train_exactly_like_resident_ones(tiny_assets, count, double_quant, checkpointing,
                                                          quantization):
    """Checkpointed around each block's call (diffusers' own: the re-run goes through the block's hooks) or
    inside its forward (fluxnb.train.speed, eager here: the re-run does not). NF4 or FP8 (fluxnb.model.fp8: codes,
    scales and biases stream; the backward's transposed copy of the codes is made from the refilled ones)."""
    model_id = str(tiny_assets.model)
    plain, streamed = model(model_id, double_quant, quantization), model(model_id, double_quant, quantization)
    blocks = offload.transformer_blocks(streamed)
    resident_bytes = [_frozen_bytes(b) for b in blocks]
    if checkpointing == "around":
        streamer = offload.stream_blocks(streamed, count)
    else:
        streamer = speed.configure(streamed, ModelConfig(offload_blocks=count, quantization=quantization),
                                   TrainConfig(compile="off"), HW, verbose=False)
        assert all(map(speed.is_checkpointed, blocks)) and not streamed.is_gradient_checkpointing
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


def test_host_arena_packs_flux_blocks_into_little_more_than_their_bytes():
    """FLUX.1-dev's NF4 block storages (4-bit codes, fp32 absmax per 64, bf16 biases), packed into power-of-two
    chunks: within 5% of their bytes, where one pinned allocation each (rounded up to a power of two by
    PyTorch's pinned allocator) takes 1.56x (9.69 GiB: the 9.71 GiB measured). Nothing is written: torch.empty
    only reserves pages."""
    from fluxnb.train.budget import DOUBLE, DOUBLE_LINEARS, SINGLE, SINGLE_LINEARS

    def storages(linears):
        return [n for i, o in linears.values() for n in (i * o // 2, i * o // 64 * 4, o * 2)]

    sizes = storages(DOUBLE_LINEARS) * DOUBLE + storages(SINGLE_LINEARS) * SINGLE
    arena = offload.HostArena(sum(sizes), pin=False)
    views = [arena.take(n) for n in sizes]
    assert [v.numel() for v in views] == sizes
    assert arena.nbytes <= 1.05 * sum(sizes)
    assert len(arena.chunks) == 25 and {c.numel() for c in arena.chunks} == {2**28}  # what PyTorch pins unrounded
    assert sum(1 << (n - 1).bit_length() for n in sizes) > 1.5 * sum(sizes)  # what per-storage pinning cost
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel()) for v in views)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two copies overlap
    bases = sorted(c.data_ptr() for c in arena.chunks)  # each copy starts on an ALIGN boundary of its chunk
    assert all((v.data_ptr() - max(b for b in bases if b <= v.data_ptr())) % arena.ALIGN == 0 for v in views)


def test_host_arena_gives_a_tiny_model_a_small_chunk_and_a_big_storage_its_own():
    arena = offload.HostArena(3000, pin=False)
    assert arena.chunk == 4096
    a, b = arena.take(1000), arena.take(1000)
    assert len(arena.chunks) == 1 and b.data_ptr() - a.data_ptr() == 1024
    big = arena.take(5000)
    assert big.numel() == 5000 and len(arena.chunks) == 2
    third = arena.take(3000)  # no room left in the first chunk (2048 of 4096 used): a new one
    assert len(arena.chunks) == 3 and third.numel() == 3000
    gap = arena.take(1500)  # first fit: back into the first chunk's free tail
    assert gap.data_ptr() == a.data_ptr() + 2048 and len(arena.chunks) == 3
    assert arena.take(0).numel() == 0 and len(arena.chunks) == 3
