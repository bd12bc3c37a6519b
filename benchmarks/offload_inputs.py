"""Issue 25's item 2, measured before it is built into fluxnb: the tensors a training step saves for its backward
pass wait in pinned CPU memory instead of on the GPU, copied out on a side stream as the forward pass goes and
back ahead of the backward pass, so that 1024x1024 might train in batches of 2 or 4 in an 8 GiB budget.

    with InputsToCPU():                 # benchmarks/train_step.py's impl option offinputs (offmin=MiB)
        loss = training_step(...)       # the forward: large saved tensors leave the GPU
    loss.backward()                     # each comes back before its block's backward needs it

What moves: with fluxnb's compiled blocks recomputing inside their backward (fluxnb.train.speed), a block saves its
inputs and its weights, nothing else (tests/test_speed.py: test_compiled_checkpointed_blocks_keep_only_their_inputs).
Weights stay: nn.Parameter (bitsandbytes' Params4bit too) and views of one (eager F.linear saves `weight.t()`), as
do tensors under `min_bytes` (NF4's absmax, LoRA's small products, RoPE's tables). What moves is the hidden states:
27 MiB per sample and block at 1024x1024 (4608 tokens x 3072 x bf16; a double-stream block's text tokens, 3 MiB per
sample, from batch 3). A single-stream block's inputs are slices of the block before's joined output: the image
tokens' moves, the text tokens' (a narrow slice) stays and keeps that whole output on the GPU, so those moves free
nothing yet (BENCHMARKS.md, "Issue 25's item 2 on the GPU"). Meant for compiled blocks: eager ones, or blocks that
keep their activations, save and move far more.

torch.autograd.graph.save_on_cpu does the same for every saved tensor, the weights included (fluxnb's streamer
already moves those), and copies on the compute stream; this one filters and overlaps. Pinned buffers come from
PyTorch's caching host allocator (`pin_memory=True`; it rounds each up to a power of two, so up to 2x the bytes
moved in host RAM), which reuses them between steps.
"""

from __future__ import annotations

import torch


class _Saved:
    """One tensor waiting on the CPU: its pinned copy, the event of that copy, and the tensor packed before it (the
    backward pass unpacks nodes in about the reverse order of the forward, so that one is fetched ahead). The copy
    is of the storage the tensor spans, so it comes back with its own shape and strides: a compiled backward
    checks them (a slice, e.g. a single-stream block's image tokens, would otherwise come back contiguous)."""

    __slots__ = ("host", "device", "copied", "previous", "shape", "stride", "fetched", "ready", "consumed")

    def __init__(self, host: torch.Tensor, device: torch.device, copied, previous: _Saved | None,
                 shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.host, self.device, self.copied, self.previous = host, device, copied, previous
        self.shape, self.stride = shape, stride
        self.fetched: torch.Tensor | None = None  # on its device, not yet handed back
        self.ready = None  # the event of that copy
        self.consumed = False  # handed back once (a retained graph's second backward fetches it again, on demand)


def _span(t: torch.Tensor) -> int:
    """How many elements of its storage `t` spans, from its first to its last (its numel when it is dense; more
    for a slice, fewer for an expanded view)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _is_weight(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class InputsToCPU(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors on `device_type` of at least `min_bytes` that are not weights go to (pinned) CPU memory while
    the forward pass runs, and come back during the backward pass: when one is unpacked, the ones saved before it
    that are not back yet start coming back, up to `ahead_bytes` (about two blocks at 1024x1024, batch 4). On CUDA
    the copies run on a side stream into memory of the compute stream's pool; device_type="cpu" (the tests) copies
    in place of moving."""

    def __init__(self, min_bytes: int = 8 << 20, ahead_bytes: int = 256 << 20, device_type: str = "cuda") -> None:
        self.min_bytes, self.ahead_bytes, self.device_type = min_bytes, ahead_bytes, device_type
        self.stream = torch.cuda.Stream() if device_type == "cuda" and torch.cuda.is_available() else None
        self.last: _Saved | None = None
        self.moved: list[tuple[int, ...]] = []  # the shapes that moved, in order
        self.moved_bytes, self.passes, self.fetches = 0, 0, 0  # over all forward passes
        super().__init__(self.pack, self.unpack)

    def __enter__(self):
        self.last = None  # a new forward pass: its tensors chain among themselves
        self.passes += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.last = None  # the autograd graph holds what its backward needs; nothing more is kept here
        return super().__exit__(*exc)

    def _event(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def pack(self, t: torch.Tensor):
        size = t.numel() * t.element_size()
        if _is_weight(t) or t.device.type != self.device_type or not size or size < self.min_bytes:
            return t
        span = _span(t)
        if span > 1.5 * t.numel():  # a narrow slice of a larger tensor (FLUX's text tokens): not worth the bytes
            return t
        region = t.as_strided((span,), (1,))  # the storage t's elements lie in, from its first
        host = torch.empty(span, dtype=t.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            host.copy_(region)
            copied = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
            with torch.cuda.stream(self.stream):
                host.copy_(region, non_blocking=True)
                copied = self._event()
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.moved.append(tuple(t.shape))
        self.moved_bytes += span * t.element_size()
        self.last = _Saved(host, t.device, copied, self.last, tuple(t.shape), t.stride())
        return self.last

    def fetch(self, saved: _Saved) -> None:
        """Start `saved`'s copy back to its device (once per unpack): allocated from the compute stream's pool,
        written on the side stream once the compute stream's queued work is done with that memory."""
        if saved.fetched is not None:
            return
        self.fetches += 1
        saved.fetched = torch.empty_like(saved.host, device=saved.device)
        if self.stream is None:
            saved.fetched.copy_(saved.host)
            return
        self.stream.wait_stream(torch.cuda.current_stream(saved.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved.copied)
            saved.fetched.copy_(saved.host, non_blocking=True)
            saved.ready = self._event()
        saved.fetched.record_stream(self.stream)

    def unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self.fetch(saved)
        t = saved.fetched.as_strided(saved.shape, saved.stride)
        saved.fetched, saved.consumed = None, True
        ahead, before = 0, saved.previous
        while before is not None and ahead < self.ahead_bytes:  # the next nodes' backward overlaps these copies
            if not before.consumed:
                self.fetch(before)
                ahead += before.host.numel() * before.host.element_size()
            before = before.previous
        if self.stream is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        return t
