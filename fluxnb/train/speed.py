"""The training step's speed and memory levers, applied in one place (the training loop and benchmarks/train_step.py).

    streamer = prepare(transformer, run.config.model, run.config.train, run.hw)   # after fluxnb.model.add_lora

- Gradient checkpointing (train.gradient_checkpointing): keep each block's input, recompute its inside during
  the backward pass. About a third more compute for far less activation memory; the blog's setting.
- Block offload (model.offload_blocks, fluxnb.train.offload): frozen weights of that many blocks wait in CPU RAM and
  stream in while the previous block computes.
- Regional compilation (train.compile): `torch.compile` of each of the 57 repeated blocks (diffusers'
  `compile_repeated_blocks`), not of the whole model: the blocks share one compiled graph per block type, so it
  compiles once per image size (bucket) and batch size. It removes most of the per-layer Python and kernel
  launch overhead that bounds the NF4 + LoRA step. The loss is the eager step's (tests/test_speed.py).
What each lever costs and buys, measured, is in BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, TrainConfig
from .offload import BlockStreamer, stream_blocks, transformer_blocks


def compile_available(hw) -> bool:
    """torch.compile's GPU code generator (Triton) is there: Linux CUDA builds have it, Windows usually not."""
    if hw.device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def use_compile(train: TrainConfig, hw) -> bool:
    if train.compile == "auto":
        return compile_available(hw)
    return train.compile == "on"


def prepare(transformer, model: ModelConfig, train: TrainConfig, hw, *, verbose: bool = True) -> BlockStreamer | None:
    """Checkpointing, offload and compile as the config says; returns the streamer (None without offload).

    Safe to call again on the same transformer (a resumed run in the same notebook): what is already set up
    stays, a changed offload_blocks replaces the old streamer."""
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    elif transformer.is_gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    streamer: BlockStreamer | None = getattr(transformer, "_fluxnb_streamer", None)
    if streamer is not None and len(streamer.parts) != min(model.offload_blocks, len(streamer.blocks)):
        streamer.remove()
        streamer = None
    if streamer is None and model.offload_blocks:
        streamer = stream_blocks(transformer, model.offload_blocks)
    transformer._fluxnb_streamer = streamer
    compiled = use_compile(train, hw)
    if compiled and not _is_compiled(transformer):
        # Static shapes: one graph per image size (bucket), no dynamic-shape code generation (an inductor
        # assertion on the tiny model's batches of 1 and 2, seen on the H100). A shape that fails to compile runs
        # eagerly instead of stopping the run: same numbers, only slower.
        torch._dynamo.config.suppress_errors = True
        transformer.compile_repeated_blocks(dynamic=False)
    if verbose:
        print(describe(streamer, compiled, len(transformer_blocks(transformer))))
    return streamer


def _is_compiled(transformer) -> bool:
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(transformer))


def describe(streamer: BlockStreamer | None, compiled: bool, blocks: int) -> str:
    where = (f"{len(streamer.parts)} of {blocks} blocks stream from CPU RAM ({streamer.offloaded_bytes / 1e9:.1f} GB)"
             if streamer else f"all {blocks} blocks on the {'GPU' if compiled else 'device'}")
    how = ("torch.compile of the blocks: on (the first steps, and the first at each new image size, take about a "
           "minute to compile)" if compiled else "torch.compile: off")
    return f"fluxnb: {where}; {how}"


def attention_backends(hw):
    """The context the training loop runs in: scaled-dot-product attention through flash / memory-efficient /
    math kernels, not cuDNN's. On an H100 (torch 2.11, cuDNN attention chosen by default) training the
    non-quantized and FP8 models hit "illegal memory access" in the backward pass with cuDNN attention and ran
    without it; BENCHMARKS.md has what the exclusion costs."""
    import contextlib

    if hw.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
