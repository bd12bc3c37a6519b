"""The training step's speed and memory levers, applied in one place (the training loop and benchmarks/train_step.py).

    streamer = configure(transformer, run.config.model, run.config.train, run.hw)   # after fluxnb.model.add_lora

- Gradient checkpointing (train.gradient_checkpointing): keep each block's input, recompute its inside during
  the backward pass. Eager, about a third more compute for far less activation memory; the blog's setting. Per block:
  the last train.keep_activations blocks keep their activations instead (fluxnb.train.budget decides how many fit).
  Compiled, a checkpointed block is not checkpointed at all: its graph is partitioned to keep only its inputs
  (torch's activation memory budget 0), so its compiled backward rebuilds, fused, just what the backward needs
  (checkpoint_inside). Measured on an H200: 0.61-0.63 s per step where checkpointing around each compiled
  block's call (diffusers' way, fluxnb's before) took 0.70-0.82 s, in the same memory. With a LoRA dropout,
  whose masks that recomputation would draw anew, fluxnb checkpoints around the calls instead.
- Block offload (model.offload_blocks, fluxnb.model.offload): frozen weights of that many blocks wait in CPU RAM and
  stream in while the previous block computes.
- Regional compilation (train.compile): `torch.compile` of each of the 57 repeated blocks (as diffusers'
  `compile_repeated_blocks`, block by block: compile_block), not of the whole model: the blocks share a compiled
  graph per block type, input layout and checkpointing, so it compiles a few graphs per image size (bucket) and
  batch size.
  It removes most of the per-layer Python and kernel launch overhead that bounds the NF4 + LoRA step. The loss
  is the eager step's (tests/test_speed.py). "auto" leaves it off below compute capability 8.0 (T4, 20-series:
  fluxnb.run.hardware.Hardware.compiles); "on" still compiles.
What each lever costs and buys, measured, is in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ModelConfig, TrainConfig
from ..model.offload import (
    BlockStreamer,
    stream_blocks,
    streamer_of,
    transformer_blocks,
)
from . import budget

RECOMPILE_LIMIT = 64  # compiled graphs per frame: ~6 per image size and batch size, so ~10 of those


def use_compile(train: TrainConfig, hw) -> bool:
    return hw.compiles(train.compile)


def configure(transformer, model: ModelConfig, train: TrainConfig, hw, *, verbose: bool = True) -> BlockStreamer | None:
    """Checkpointing, offload and compile as the config says; returns the streamer (None without offload).

    Safe to call again on the same transformer (a resumed run in the same notebook): what is already set up
    stays, a changed offload_blocks replaces the old streamer."""
    blocks = transformer_blocks(transformer)
    kept = kept_blocks(train, len(blocks))
    compiled = use_compile(train, hw)
    # The compiler's recomputation draws random numbers afresh (a LoRA dropout's mask would differ from the
    # forward's); torch.utils.checkpoint replays them. So with dropout, checkpoint around each compiled call.
    set_checkpointing(transformer, blocks[:len(blocks) - kept], around=compiled and _has_dropout(blocks))
    streamer = streamer_of(transformer)
    if streamer is not None and len(streamer.parts) != min(model.offload_blocks, len(streamer.blocks)):
        streamer.remove()
        streamer = None
    if streamer is None and model.offload_blocks:
        streamer = stream_blocks(transformer, model.offload_blocks)
    if compiled:
        # A shape that fails to compile runs eagerly instead of stopping the run: same numbers, only slower (and
        # a checkpointed block that falls back whole is then checkpointed eagerly, in the same memory).
        torch._dynamo.config.suppress_errors = True
        # The blocks share compiled frames, whose graphs add up: per image size and batch, one per block type (and
        # input layout: the first single-stream block's differs) x training or no gradients (validation,
        # samples). torch's default of 8 per frame would leave a run with two buckets eager from its second.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name < 2.7
        setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
        for block in blocks:
            compile_block(block)
    if verbose:
        print(describe(streamer, compiled, len(blocks)) + (f"; {kept} blocks keep their activations" if kept else ""))
    return streamer


def kept_blocks(train: TrainConfig, blocks: int) -> int:
    """How many of the last `blocks` keep their activations: all without gradient checkpointing."""
    return min(train.keep_activations, blocks) if train.gradient_checkpointing else blocks


def set_checkpointing(transformer, checkpointed: list[torch.nn.Module], around: bool = False) -> None:
    """Gradient checkpointing of the `checkpointed` blocks (the others keep their activations): inside each one's
    forward (checkpoint_inside), or, with `around`, around each one's call through diffusers'
    gradient_checkpointing_func, which runs a compiled block's whole compiled forward again in the backward pass
    (slower, but it replays the forward's random numbers)."""
    ids = {id(b) for b in checkpointed}
    for block in transformer_blocks(transformer):
        checkpoint_inside(block, id(block) in ids and not around)
    if around and ids:
        def run(block, *inputs):  # diffusers calls it for every block
            if id(block) not in ids:
                return block(*inputs)
            return torch.utils.checkpoint.checkpoint(block.__call__, *inputs, use_reentrant=False)

        transformer.enable_gradient_checkpointing(run)
    elif transformer.is_gradient_checkpointing:
        transformer.disable_gradient_checkpointing()


def _has_dropout(blocks: list[torch.nn.Module]) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for b in blocks for m in b.modules())


def checkpoint_inside(block: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing of one block, on or off, set inside its forward (an instance attribute wrapping it).

    Eager (compile off, e.g. on a T4, or a block that falls back to eager whole), it is torch.utils.checkpoint:
    the block keeps its inputs and the backward pass runs its forward again. Compiled (compile_block), the
    wrapper steps aside and the block's graph is partitioned to keep only its inputs, so its compiled backward
    rebuilds just the tensors the backward needs (not, e.g., the frozen output matmuls of attention and MLP,
    whose outputs no gradient needs), fused into its kernels. The same memory either way. diffusers' own
    checkpointing, around the call of a compiled block, runs all of its compiled forward again: in a 6 GiB plan
    on an H200, 0.70-0.82 s per step that way and 0.61 s this way, both at a 5.44 GiB peak (BENCHMARKS.md)."""
    wrapped = _wrapped_forward(block)
    if on and wrapped is None:
        block.forward = _checkpointed(block.forward)
    elif not on and wrapped is not None:
        if getattr(wrapped, "__func__", None) is type(block).forward:
            del block.forward  # the class's forward again
        else:
            block.forward = wrapped


def _checkpointed(forward):
    def run(*args, **kwargs):
        # Traced by torch.compile: the plain forward (compile_block's partitioner does the recomputing);
        # validation and sampling (no gradients): nothing to recompute.
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run._fluxnb_checkpointed = forward
    return run


def compile_block(block: torch.nn.Module) -> None:
    """Regional compilation of one block (as diffusers' compile_repeated_blocks, block by block), again only when
    its checkpointing changed: a checkpointed block gets a compiler whose partitioner keeps only the graph's
    inputs for the backward pass (torch._functorch.config.activation_memory_budget = 0), a kept block the
    default, which keeps what makes the backward fastest. Static shapes: one graph per image size (bucket) and
    batch size, no dynamic-shape code generation (an inductor assertion on the tiny model's batches of 1 and 2,
    seen on the H100)."""
    mode = "recompute" if is_checkpointed(block) else "keep"
    if getattr(block, "_fluxnb_compiled", None) == mode and block._compiled_call_impl is not None:
        return
    block.compile(dynamic=False, **({"backend": _recomputing_inductor} if mode == "recompute" else {}))
    block._fluxnb_compiled = mode


def _recomputing_inductor(graph, example_inputs):
    """torch.compile's default compiler (inductor), its forward/backward partition keeping only the inputs."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(activation_memory_budget=0.0):
        return compile_fx(graph, example_inputs)


def is_checkpointed(block: torch.nn.Module) -> bool:
    return _wrapped_forward(block) is not None


def _wrapped_forward(block: torch.nn.Module):
    """The forward that checkpoint_inside's wrapper on `block` wraps, or None without one."""
    return getattr(vars(block).get("forward"), "_fluxnb_checkpointed", None)


def fit_budget(transformer, model: ModelConfig, train: TrainConfig, hw, tokens: int, peak_gib: float | None = None):
    """After the first optimizer step: if the peak so far (measured on CUDA) is over the plan's budget
    (train.memory_budget_gib), move one notch toward memory (fluxnb.train.budget.adjust) and configure again. `tokens`:
    image + text tokens of one sample. Returns the adjusted (model, train), or None when nothing changed. The
    config on disk keeps the plan; a resumed run measures again."""
    if peak_gib is None and hw.device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(hw.device) / 2**30
    if not train.memory_budget_gib or peak_gib is None:
        return None
    n = len(transformer_blocks(transformer))
    layout = budget.Layout(train.batch_size, min(model.offload_blocks, n), kept_blocks(train, n),
                           use_compile(train, hw), model.quantization)
    smaller = budget.adjust(layout, peak_gib, train.memory_budget_gib, tokens)
    if smaller is None:
        return None
    train = replace(train, keep_activations=smaller.kept, gradient_checkpointing=True)
    print(f"fluxnb: peak {peak_gib:.2f} GiB is over what the {train.memory_budget_gib:g} GiB budget leaves usable; "
          f"{smaller.kept} of {n} blocks keep their activations from now on ({layout.kept} before)")
    configure(transformer, model, train, hw, verbose=False)
    return model, train


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
    access" in cuDNN attention's backward pass, and on an H200 (torch 2.11, 2026-12-03) fluxnb's FP8 model trained
    with it had NaN gradients from the first step (benchmarks/train_step.py, impl option cudnn). Every NF4
    benchmark run trained with cuDNN attention without a fault, and its forward + backward at FLUX's shapes ran
    clean (benchmarks/sdpa_compile_check.py); the exclusion holds under torch.compile too, traced or run inside it
    (BENCHMARKS.md)."""
    import contextlib

    if hw.device.type != "cuda" or quantization == "nf4":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
