"""Memory reports: what the GPU and the process hold, as a dict and as a small table.

    with measure("encode prompts") as m:   # peak GPU memory of just this block
        ...
    print(m)                                # table; m.stats is the dict
    free(pipe)                              # really release a model, even if other names still point at it
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from diffusers.training_utils import free_memory

GiB = 2**30


def snapshot() -> dict[str, float]:
    """Current and peak GPU memory (allocated by tensors / reserved by PyTorch's caching allocator), CPU RSS; GiB."""
    stats = {"cpu_rss_gib": psutil.Process().memory_info().rss / GiB}
    if torch.cuda.is_available():
        stats |= {
            "gpu_allocated_gib": torch.cuda.memory_allocated() / GiB,
            "gpu_reserved_gib": torch.cuda.memory_reserved() / GiB,
            "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }
    return stats


def format_table(stats: dict[str, float], title: str = "memory") -> str:
    width = max(len(k) for k in stats)
    lines = [title, "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:8.3f} GiB" if k.endswith("_gib") else f"{k:<{width}}  {v:8.2f} s" for k, v in stats.items()]
    return "\n".join(lines)


def report(title: str = "memory") -> str:
    return format_table(snapshot(), title)


@dataclass
class Measurement:
    title: str
    stats: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_table(self.stats, self.title)


@contextlib.contextmanager
def measure(title: str = "block") -> Iterator[Measurement]:
    """Measure one block: peak GPU memory inside it (peak counters are reset on entry), RSS after, seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = Measurement(title)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result.stats = snapshot() | {"seconds": time.perf_counter() - start}


def _modules(obj: Any) -> Iterator[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _modules(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _modules(value)
    elif hasattr(obj, "components"):  # a DiffusionPipeline
        if hasattr(obj, "remove_all_hooks"):
            obj.remove_all_hooks()  # cpu-offload hooks hold references to the modules
        yield from _modules(dict(obj.components))


@dataclass(frozen=True)
class Freed:
    """What `free` gave back: GPU memory (as CUDA's allocator counts it) and the size of the weights it emptied."""

    gpu_gib: float
    weights_gib: float
    cuda: bool

    def __str__(self) -> str:
        if self.cuda:
            return f"freed {self.gpu_gib:.2f} GiB of GPU memory ({self.weights_gib:.2f} GiB of weights emptied)"
        # Without a GPU the weights lived in RAM; the process's RSS may not shrink at once (the allocator keeps pages).
        size = f"{self.weights_gib:.2f} GiB" if self.weights_gib >= 0.01 else f"{self.weights_gib * 1024:.1f} MiB"
        return f"emptied {size} of weights in CPU RAM (no GPU here, so no GPU memory to free)"


def free(*objs: Any) -> Freed:
    """Release the weights of models / pipelines now; returns what was given back (`print` it).

    `del model` alone frees nothing while a pipeline, an optimizer or a notebook's `Out[]` still holds a
    reference. Here every parameter and buffer is swapped for an empty tensor, so the storage goes whatever
    else still points at the module; the module is unusable afterwards.
    """
    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() if cuda else 0
    emptied = 0
    for obj in objs:
        for module in _modules(obj):
            for tensor in [*module.parameters(), *module.buffers()]:
                emptied += tensor.data.nbytes  # tied weights count once: the second visit sees an empty tensor
                tensor.data = torch.empty(0, dtype=tensor.dtype, device="cpu")
    free_memory()  # gc.collect() + empty the accelerator's cache
    after = torch.cuda.memory_allocated() if cuda else 0
    return Freed((before - after) / GiB, emptied / GiB, cuda)
