"""The training step's speed and memory levers, applied in one place (the training loop and benchmarks/train_step.py).

    streamer = prepare(transformer, run.config.model, run.config.train, run.hw)   # after fluxnb.model.add_lora

- Gradient checkpointing (train.gradient_checkpointing): keep each block's input, recompute its inside during
  the backward pass. About a third more compute for far less activation memory; the blog's setting. Per block:
  the last train.keep_activations blocks keep their activations instead (fluxnb.budget decides how many fit).
- Block offload (model.offload_blocks, fluxnb.train.offload): frozen weights of that many blocks wait in CPU RAM and
  stream in while the previous block computes.
- Regional compilation (train.compile): `torch.compile` of each of the 57 repeated blocks (diffusers'
  `compile_repeated_blocks`), not of the whole model: the blocks share one compiled graph per block type, so it
  compiles once per image size (bucket) and batch size. It removes most of the per-layer Python and kernel
  launch overhead that bounds the NF4 + LoRA step. The loss is the eager step's (tests/test_speed.py). "auto"
  leaves it off below compute capability 8.0 (T4, 20-series): Triton's support for sm_75 is poor and a T4's
  step is bound by arithmetic, not by launch overhead, so compiling buys little there; "on" still compiles.
What each lever costs and buys, measured, is in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import budget
from ..config import ModelConfig, TrainConfig
from .offload import BlockStreamer, stream_blocks, streamer_of, transformer_blocks


def compile_available(hw) -> bool:
    """torch.compile's GPU code generator (Triton) is there: Linux CUDA builds have it, Windows usually not."""
    if hw.device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def use_compile(train: TrainConfig, hw) -> bool:
    if train.compile == "auto":
        return compile_available(hw) and (hw.gpu is None or hw.gpu.capability >= (8, 0))
    return train.compile == "on"


def prepare(transformer, model: ModelConfig, train: TrainConfig, hw, *, verbose: bool = True) -> BlockStreamer | None:
    """Checkpointing, offload and compile as the config says; returns the streamer (None without offload).

    Safe to call again on the same transformer (a resumed run in the same notebook): what is already set up
    stays, a changed offload_blocks replaces the old streamer."""
    blocks = transformer_blocks(transformer)
    kept = kept_blocks(train, len(blocks))
    if kept < len(blocks):
        transformer.enable_gradient_checkpointing(_checkpoint_all_but(blocks[len(blocks) - kept:]))
    elif transformer.is_gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    streamer = streamer_of(transformer)
    if streamer is not None and len(streamer.parts) != min(model.offload_blocks, len(streamer.blocks)):
        streamer.remove()
        streamer = None
    if streamer is None and model.offload_blocks:
        streamer = stream_blocks(transformer, model.offload_blocks)
    compiled = use_compile(train, hw)
    if compiled and not _is_compiled(transformer):
        # Static shapes: one graph per image size (bucket), no dynamic-shape code generation (an inductor
        # assertion on the tiny model's batches of 1 and 2, seen on the H100). A shape that fails to compile runs
        # eagerly instead of stopping the run: same numbers, only slower.
        torch._dynamo.config.suppress_errors = True
        transformer.compile_repeated_blocks(dynamic=False)
    if verbose:
        print(describe(streamer, compiled, len(blocks)) + (f"; {kept} blocks keep their activations" if kept else ""))
    return streamer


def kept_blocks(train: TrainConfig, blocks: int) -> int:
    """How many of the last `blocks` keep their activations: all without gradient checkpointing."""
    return min(train.keep_activations, blocks) if train.gradient_checkpointing else blocks


def _checkpoint_all_but(kept: list[torch.nn.Module]):
    """diffusers' gradient_checkpointing_func (it calls `func(block, *inputs)` for every block): checkpoint each
    block except the `kept` ones, which run as without checkpointing and keep their activations."""
    kept_ids = {id(b) for b in kept}

    def run(block, *inputs):
        if id(block) in kept_ids:
            return block(*inputs)
        return torch.utils.checkpoint.checkpoint(block.__call__, *inputs, use_reentrant=False)

    return run


def fit_budget(transformer, model: ModelConfig, train: TrainConfig, hw, tokens: int, peak_gib: float | None = None):
    """After the first optimizer step: if the peak so far (measured on CUDA) is over the plan's budget
    (train.memory_budget_gib), move one notch toward memory (fluxnb.budget.adjust) and prepare again. `tokens`:
    image + text tokens of one sample. Returns the adjusted (model, train), or None when nothing changed. The
    config on disk keeps the plan; a resumed run measures again."""
    if peak_gib is None and hw.device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(hw.device) / 2**30
    if not train.memory_budget_gib or peak_gib is None:
        return None
    n = len(transformer_blocks(transformer))
    layout = budget.Layout(train.batch_size, min(model.offload_blocks, n), kept_blocks(train, n))
    smaller = budget.adjust(layout, peak_gib, train.memory_budget_gib, tokens)
    if smaller is None:
        return None
    train = replace(train, keep_activations=smaller.kept, gradient_checkpointing=True)
    print(f"fluxnb: peak {peak_gib:.2f} GiB is over what the {train.memory_budget_gib:g} GiB budget leaves usable; "
          f"{smaller.kept} of {n} blocks keep their activations from now on ({layout.kept} before)")
    prepare(transformer, model, train, hw, verbose=False)
    return model, train


def _is_compiled(transformer) -> bool:
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(transformer))


def describe(streamer: BlockStreamer | None, compiled: bool, blocks: int) -> str:
    where = (f"{len(streamer.parts)} of {blocks} blocks stream from CPU RAM ({streamer.offloaded_bytes / 1e9:.1f} GB)"
             if streamer else f"all {blocks} blocks on the {'GPU' if compiled else 'device'}")
    how = ("torch.compile of the blocks: on (the first steps, and the first at each new image size, take about a "
           "minute to compile)" if compiled else "torch.compile: off")
    return f"fluxnb: {where}; {how}"


def attention_backends(hw, quantization: str = "nf4"):
    """The context the training loop runs in. NF4 (QLoRA): PyTorch's own choice of scaled-dot-product attention
    kernel (cuDNN's on an H100/H200, the fastest there). The non-quantized and FP8 models: flash /
    memory-efficient / math kernels, not cuDNN's: on an H100 (torch 2.11) training them hit "illegal memory
    access" in cuDNN attention's backward pass. Every NF4 benchmark run trained with cuDNN attention without a
    fault, and its forward + backward at FLUX's shapes ran clean (benchmarks/sdpa_compile_check.py); the exclusion
    holds under torch.compile too, traced or run inside it (BENCHMARKS.md)."""
    import contextlib

    if hw.device.type != "cuda" or quantization == "nf4":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
