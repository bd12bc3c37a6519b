"""Issue 25's item 2, measured before it is built into fluxnb: the tensors a training step saves for its backward
pass wait in pinned CPU memory instead of on the GPU, copied out on a side stream as the forward pass goes and
back one ahead of the backward pass, so that 1024x1024 trains in batches of 2 or 4 in an 8 GiB budget.

    with InputsToCPU():                 # benchmarks/train_step.py's impl option offinputs (offmin=MiB)
        loss = training_step(...)       # the forward: large saved tensors leave the GPU
    loss.backward()                     # each comes back before its block's backward needs it

What moves: with fluxnb's compiled blocks recomputing inside their backward (fluxnb.train.speed), a block saves its
inputs and its weights, nothing else (tests/test_offload_inputs.py checks that on the CPU). Weights are
nn.Parameter (bitsandbytes' Params4bit too) and stay, as do tensors under `min_bytes` (NF4's absmax, a LoRA's
small inputs, RoPE's tables): what moves is the hidden states, 28 MiB per sample and block at 1024x1024.

torch.autograd.graph.save_on_cpu does the same for every saved tensor, the weights included (fluxnb's streamer
already moves those), and copies on the compute stream; this one filters and overlaps. Pinned buffers come from
PyTorch's caching host allocator (`pin_memory=True`), which reuses them between steps.
"""

from __future__ import annotations

import torch


class _Saved:
    """One tensor waiting on the CPU: its pinned copy, when that copy is complete, and the tensor packed before it
    (the backward pass unpacks in about the reverse order, so that one is fetched next)."""

    __slots__ = ("host", "device", "copied", "previous", "fetched", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, copied, previous: _Saved | None) -> None:
        self.host, self.device, self.copied, self.previous = host, device, copied, previous
        self.fetched: torch.Tensor | None = None
        self.ready = None


class InputsToCPU(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors on `device_type` of at least `min_bytes` that are not parameters go to (pinned) CPU memory while
    the forward pass runs, and come back during the backward pass, each fetched when the one saved after it is
    unpacked. On CUDA the copies run on a side stream; device_type="cpu" (the tests) copies in place of moving."""

    def __init__(self, min_bytes: int = 8 << 20, device_type: str = "cuda") -> None:
        self.min_bytes, self.device_type = min_bytes, device_type
        self.stream = torch.cuda.Stream() if device_type == "cuda" else None
        self.last: _Saved | None = None
        self.moved: list[tuple[int, ...]] = []  # the shapes that moved, in order
        self.moved_bytes, self.passes = 0, 0  # over all forward passes
        super().__init__(self.pack, self.unpack)

    def __enter__(self):
        self.last = None  # a new forward pass: its tensors chain among themselves
        self.passes += 1
        return super().__enter__()

    def _event(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def pack(self, t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or t.device.type != self.device_type
                or t.numel() * t.element_size() < self.min_bytes):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            host.copy_(t)
            copied = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                copied = self._event()
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.moved.append(tuple(t.shape))
        self.moved_bytes += t.numel() * t.element_size()
        self.last = _Saved(host, t.device, copied, self.last)
        return self.last

    def fetch(self, saved: _Saved) -> None:
        """Start `saved`'s copy back to its device, on the side stream (once per unpack)."""
        if saved.fetched is not None:
            return
        if self.stream is None:
            saved.fetched = saved.host.clone()
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved.copied)
            saved.fetched = saved.host.to(saved.device, non_blocking=True)
            saved.ready = self._event()

    def unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self.fetch(saved)
        if saved.previous is not None:
            self.fetch(saved.previous)  # the next block's backward overlaps this copy
        t, saved.fetched = saved.fetched, None  # the copy is the caller's; the pinned one stays with the graph
        if self.stream is not None:
            current = torch.cuda.current_stream(saved.device)
            current.wait_event(saved.ready)
            t.record_stream(current)  # allocated on the side stream, used on this one
        return t
