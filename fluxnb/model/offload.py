"""Block offload for training: the frozen weights of some transformer blocks live in (pinned) CPU RAM and are
copied to the GPU just before each use, on a second CUDA stream, while the block before runs.

    streamer = stream_blocks(transformer, 57)     # all 57: 1.6 GiB instead of 7.7 (NF4 FLUX, 512x768, batch 1)
    ...train...
    streamer.remove()                             # everything back on the GPU, hooks gone

Why not diffusers' group offloading: it is built for inference. It swaps `param.data` for a CPU copy made when
offloading was enabled, which would also swap the LoRA weights back to their initial values, and while training
the autograd graph still holds each GPU weight (bitsandbytes keeps it for the backward pass), so nothing would be
freed. Here the GPU tensors keep their identity: an offloaded weight's storage is resized to zero bytes (the
memory goes back to PyTorch's allocator) and refilled from its CPU copy before the block runs again: in the
forward pass, and in the backward pass (where gradient checkpointing may also re-run the block). Every view of
the weight, including the one autograd kept, sees the refilled data. Only frozen tensors move: the LoRA weights,
their gradients and optimizer state stay on the GPU.

Schedule (blocks run 0..56 forward, 56..0 backward): on entering block i, the next offloaded block in the
direction of travel is prefetched; a block's weights are released once its forward (or, in training, its
backward) is done. So at most two offloaded blocks are on the GPU at once. PCIe time per step: the offloaded
bytes x 2 (forward, backward); the benchmark measures how much of it the compute hides.

CPU RAM: the copies are packed into pinned chunks of one power-of-two size (`HostArena`), since PyTorch's pinned
allocator rounds every allocation up to a power of two: pinning each storage on its own took 9.7 GiB for the
6.2 GiB of FLUX.1-dev's NF4 blocks (measured in the 8 GB card rehearsal, BENCHMARKS.md; the arena: 6.25).
"""

from __future__ import annotations

import torch

__all__ = ["BlockStreamer", "HostArena", "pick_blocks", "stream_blocks", "streamer_of", "transformer_blocks"]
ATTRIBUTE = "_fluxnb_streamer"  # where a model keeps its streamer (fluxnb.base.memory.free looks for it by name)


def pick_blocks(total: int, count: int) -> list[int]:
    """`count` of `total` block indices, spread evenly, so each transfer has resident blocks' compute to hide in
    (fluxnb.train.budget estimates memory with the same choice)."""
    count = min(max(count, 0), total)
    return sorted({round(k * total / count) for k in range(count)}) if count else []


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """FLUX's repeated blocks in the order they run: 19 double-stream, then 38 single-stream (in FLUX.1-dev)."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """Every frozen tensor of a block that holds memory: weights, biases, norm scales and the NF4 scales
    (bitsandbytes keeps those in the weight's quant_state, outside the parameters)."""
    found: dict[int, torch.Tensor] = {}
    for p in block.parameters():
        if not p.requires_grad:
            found[id(p)] = p
            state = getattr(p, "quant_state", None)
            for t in _quant_state_tensors(state):
                found[id(t)] = t
    for b in block.buffers():
        found[id(b)] = b
    return [t for t in found.values() if t.numel()]


def _quant_state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    tensors = [t for t in (state.absmax, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
    return tensors + _quant_state_tensors(getattr(state, "state2", None))


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _storages(tensors: list[torch.Tensor]) -> list[torch.UntypedStorage]:
    """The distinct storages behind `tensors`, each resizable (so it can be emptied and refilled in place)."""
    for t in tensors:  # e.g. memory-mapped from a safetensors file: give it a storage of its own
        if not t.untyped_storage().resizable():
            t.data = t.data.clone()
    return list({t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}.values())


class HostArena:
    """CPU RAM for the copies: chunks of one power-of-two size (pinned for a CUDA model), filled first-fit.

    PyTorch's pinned allocator rounds each allocation up to the next power of two, so a chunk of exactly such a
    size is pinned without waste; what is lost is the tail of a chunk that the next storage does not fit
    (a few percent with FLUX's storages of at most 28 MB in 256 MiB chunks). A storage larger than a chunk gets
    an allocation of its own, rounded up as before (none in FLUX)."""

    ALIGN = 512  # bytes: each copy starts where the copy engine reads at full speed
    CHUNK = 2**28

    def __init__(self, total: int, pin: bool) -> None:
        self.chunk = min(self.CHUNK, max(self.ALIGN, 1 << max(total - 1, 1).bit_length()))  # tiny model: small
        self.pin, self.chunks, self.used = pin, [], []

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of CPU RAM, as a uint8 view of a chunk (a chunk of its own when larger than the chunk size)."""
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8)
        if nbytes > self.chunk:
            self.chunks.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))
            self.used.append(nbytes)
            return self.chunks[-1]
        for k, used in enumerate(self.used):
            if used + nbytes <= self.chunk:
                break
        else:
            self.chunks.append(torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pin))
            self.used.append(0)
            k = len(self.chunks) - 1
        start = self.used[k]
        self.used[k] = min(self.chunk, -(-(start + nbytes) // self.ALIGN) * self.ALIGN)
        return self.chunks[k][start:start + nbytes]

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)


class _Offloaded:
    """One block's frozen storages on the device (emptied while offloaded) and their CPU copies.

    Whole storages move, not tensors: a tensor may be a view of a larger buffer, and every view must come back."""

    def __init__(self, storages: list[torch.UntypedStorage], arena: HostArena) -> None:
        self.storages = storages
        self.nbytes = [s.nbytes() for s in storages]
        self.copies = [arena.take(n).copy_(_bytes(s)) for s, n in zip(storages, self.nbytes)]
        self.loaded = True
        self.ready: torch.cuda.Event | None = None  # set when a copy was queued on the side stream

    def free(self) -> None:
        for s in self.storages:
            s.resize_(0)
        self.loaded, self.ready = False, None

    def fill(self, stream: torch.cuda.Stream | None) -> None:
        """Allocate on the compute stream (so memory just freed there is reused in order), copy on `stream`."""
        for s, n in zip(self.storages, self.nbytes):
            s.resize_(n)
        if stream is None:
            for s, c in zip(self.storages, self.copies):
                _bytes(s).copy_(c)
        else:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
            with torch.cuda.stream(stream):
                for s, c in zip(self.storages, self.copies):
                    _bytes(s).copy_(c, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.loaded = True

    def restore(self) -> None:
        if not self.loaded:
            self.fill(None)


class BlockStreamer:
    """Keeps the frozen weights of `offloaded` blocks off the GPU except while they run; see the module docstring."""

    def __init__(self, blocks: list[torch.nn.Module], offloaded: list[int], owner=None) -> None:
        self.blocks, self._owner = blocks, owner  # owner: the model it is attached to (stream_blocks)
        device = next(t.device for b in blocks for t in _frozen_tensors(b))
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        storages = {i: _storages(_frozen_tensors(blocks[i])) for i in offloaded}
        self.arena = HostArena(sum(s.nbytes() for ss in storages.values() for s in ss), pin=device.type == "cuda")
        self.parts = {i: _Offloaded(ss, self.arena) for i, ss in storages.items()}
        self.order = sorted(self.parts)
        self.offloaded_bytes = sum(sum(p.nbytes) for p in self.parts.values())
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook(self._before, i)))
            self._handles.append(block.register_forward_hook(self._hook(self._after, i)))
        for part in self.parts.values():
            part.free()
        if self.stream is not None:  # hand the freed memory back, so other programs (and nvidia-smi) see it
            torch.cuda.empty_cache()

    @staticmethod
    def _hook(fn, i):
        # Runs eagerly even inside a torch.compile'd block: the streams and storages are not graph material.
        return torch._dynamo.disable(lambda module, *args: fn(i, *args))

    @staticmethod
    def _in_backward() -> bool:
        # Checkpointing around a block's call (diffusers' own; fluxnb's with a LoRA dropout: speed.set_checkpointing)
        # calls the block again during the backward pass; those calls land here. fluxnb's checkpointing inside the
        # forward re-runs it without its hooks, after _before_backward has loaded it.
        return torch._C._current_graph_task_id() != -1

    def _load(self, i: int) -> None:
        part = self.parts[i]
        if not part.loaded:
            part.fill(self.stream)
        if part.ready is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(part.ready)
            part.ready = None

    def _prefetch(self, i: int, step: int) -> None:
        ahead = [j for j in self.order if (j > i if step > 0 else j < i)]
        if ahead:
            j = ahead[0] if step > 0 else ahead[-1]
            if not self.parts[j].loaded:
                self.parts[j].fill(self.stream)

    def _release(self, keep) -> None:
        for j, part in self.parts.items():
            if part.loaded and not keep(j):
                part.free()

    def _before(self, i: int, args, kwargs=None) -> None:
        if self._in_backward():  # the checkpoint's re-run: the backward hook below already loaded it
            if i in self.parts:
                self._load(i)
            return
        self._release(lambda j: j >= i)  # anything left from an earlier pass (e.g. block 0 after a backward)
        if i in self.parts:
            self._load(i)
        self._prefetch(i, +1)

    def _after(self, i: int, args, output) -> None:
        if self._in_backward():
            return
        if i in self.parts:
            self.parts[i].free()  # queued kernels keep running: the allocator reuses the memory in stream order
        outputs = output if isinstance(output, tuple) else (output,)
        needs_grad = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        for t in needs_grad:  # fires when the gradient reaches this block's output: its backward starts next
            t.register_hook(lambda grad: self._before_backward(i))  # returns None: the gradient is unchanged

    def _before_backward(self, i: int) -> None:
        self._release(lambda j: j <= i)  # blocks after i have finished their backward
        if i in self.parts:
            self._load(i)
        self._prefetch(i, -1)

    def remove(self) -> None:
        """Put every weight back on the GPU for good and remove the hooks."""
        for part in self.parts.values():
            part.restore()
        self.close()

    def close(self) -> None:
        """Drop the hooks and the CPU copies without putting anything back: for a model that is being freed
        (fluxnb.base.memory.free calls it), whose streamed weights would otherwise stay in pinned RAM."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.stream is not None:  # work queued after this waits for the side stream's copies into GPU storages
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.parts.clear()
        self.arena = None
        if streamer_of(self._owner) is self:
            setattr(self._owner, ATTRIBUTE, None)


def streamer_of(transformer) -> BlockStreamer | None:
    """The streamer stream_blocks attached to `transformer`, or None."""
    return getattr(transformer, ATTRIBUTE, None)


def stream_blocks(transformer, count: int) -> BlockStreamer:
    """Offload `count` of the transformer's blocks (all of them when count >= their number; 57 in FLUX.1-dev),
    attached to it (streamer_of) until its remove() or close()."""
    blocks = transformer_blocks(transformer)
    streamer = BlockStreamer(blocks, pick_blocks(len(blocks), count), owner=transformer)
    setattr(transformer, ATTRIBUTE, streamer)
    return streamer
