"""Memory reports: what the GPU and the process hold, as a dict and as a small table.

    with measure("encode prompts") as m:   # peak GPU memory of just this block
        ...
    print(m)                                # table; m.stats is the dict
    free(pipe)                              # really release a model, even if other names still point at it

FLUXNB_PEAKS_FILE=peaks.json makes `start_peak_log` (called by every notebook's open_run) write this process's
peaks there, refreshed every second and at exit: GPU allocated / reserved, host RSS split into anonymous and
file-backed pages (/proc/self/status: mmap'd safetensors pages are file-backed and the kernel can drop them,
anonymous memory it cannot), bytes written to disk. benchmarks/rehearsal.py reads them per notebook.
FLUXNB_WATCH_DTYPE=bfloat16 adds how many operations computed a tensor of that dtype, and which (the T4
envelope: a T4 has no bf16 arithmetic, so none should).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from diffusers.training_utils import free_memory

GiB = 2**30
PEAKS_ENV = "FLUXNB_PEAKS_FILE"
HOST_MEMORY_ENV = "FLUXNB_HOST_MEMORY_GIB"  # emulate a machine with this much RAM (merge's check reads it)
WATCH_DTYPE_ENV = "FLUXNB_WATCH_DTYPE"


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
        if _peak_log is not None:
            _peak_log.sample()  # the process-wide peak, before this block's reset forgets it
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
        # Without a GPU the weights lived in RAM, which trim_host_memory handed back (with glibc).
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
            streamer = getattr(module, "_fluxnb_streamer", None)  # fluxnb.model.offload.ATTRIBUTE: pinned copies
            if streamer is not None:
                streamer.close()  # detaches itself
            for tensor in [*module.parameters(), *module.buffers()]:
                emptied += tensor.data.nbytes  # tied weights count once: the second visit sees an empty tensor
                tensor.data = torch.empty(0, dtype=tensor.dtype, device="cpu")
    free_memory()  # gc.collect() + empty the accelerator's cache
    if cuda:  # pinned CPU RAM PyTorch keeps for reuse (streamed blocks'); a block is kept while a copy may use it
        torch.cuda.synchronize()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()
    trim_host_memory()
    after = torch.cuda.memory_allocated() if cuda else 0
    return Freed((before - after) / GiB, emptied / GiB, cuda)


def trim_host_memory() -> None:
    """Hand freed CPU RAM back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold (which rises up to 32 MiB after the first large free: most
    weight tensors) inside the process, where they still count against a Colab VM's RAM or a cgroup's limit. So a
    model freed, or moved to the GPU, leaves its RAM behind until this runs."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim this way
        pass


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile, RssShmem of a process, GiB; {} where /proc is missing."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    keys = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"}
    fields = (line.split(":") for line in lines)
    return {k: int(v.split()[0]) * 1024 / GiB for k, v in fields if k in keys}  # "123 kB"


def _written_gib() -> float:
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0.0
    return int(io["write_bytes"]) / GiB


class DtypeWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that compute a tensor of `dtype` (by operation, the first 20 kinds): not views, and
    not copies of a tensor already in it (weights read from a file saved in it, moved to the GPU), which a GPU
    without that dtype's arithmetic still holds and moves as plain bytes."""

    MOVES = {"aten._to_copy.default", "aten.copy_.default", "aten.clone.default", "aten._pin_memory.default"}

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.count, self.ops = dtype, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and self._has(out) and not (str(func) in self.MOVES and self._has((args, kwargs))):
            self.count += 1
            name = str(func)
            if name in self.ops or len(self.ops) < 20:
                self.ops[name] = self.ops.get(name, 0) + 1
        return out

    def _has(self, tree) -> bool:
        return any(isinstance(t, torch.Tensor) and t.dtype == self.dtype for t in torch.utils._pytree.tree_leaves(tree))


class PeakLog(threading.Thread):
    """Samples /proc/self/status and the CUDA peak counters every `every` seconds and keeps the maxima."""

    def __init__(self, path: str | os.PathLike, every: float = 0.05) -> None:
        super().__init__(daemon=True, name="fluxnb-peaks")
        self.path, self.every, self.peaks, self.lock = str(path), every, {}, threading.Lock()
        self.start_time, self.written_at_start = time.time(), _written_gib()
        self.watch: DtypeWatch | None = None

    def sample(self) -> None:
        now = {f"host_{k}_gib": v for k, v in proc_status().items()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            now |= {"gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                    "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
        with self.lock:
            for k, v in now.items():
                self.peaks[k] = max(v, self.peaks.get(k, 0.0))

    def write(self) -> None:
        self.sample()
        with self.lock:
            out = {"pid": os.getpid(), "seconds": time.time() - self.start_time,
                   "disk_written_gib": _written_gib() - self.written_at_start, **self.peaks}
            if self.watch is not None:
                out |= {"watched_dtype": str(self.watch.dtype).removeprefix("torch."),
                        "watched_ops": self.watch.count, "watched_by_op": dict(self.watch.ops)}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, self.path)

    def run(self) -> None:
        last = 0.0
        while True:
            time.sleep(self.every)
            self.sample()
            if time.time() - last > 1.0:
                self.write()
                last = time.time()


_peak_log: PeakLog | None = None


def start_peak_log() -> PeakLog | None:
    """Start logging this process's peaks to $FLUXNB_PEAKS_FILE (once; nothing when it is unset)."""
    global _peak_log
    path = os.environ.get(PEAKS_ENV)
    if not path or _peak_log is not None:
        return _peak_log
    _peak_log = PeakLog(path)
    if os.environ.get(WATCH_DTYPE_ENV):  # on this (the notebook's) thread from here on
        _peak_log.watch = DtypeWatch(getattr(torch, os.environ[WATCH_DTYPE_ENV]))
        _peak_log.watch.__enter__()
    _peak_log.write()
    _peak_log.start()
    atexit.register(_peak_log.write)
    return _peak_log


def available_ram_gib() -> float:
    """RAM this process can still get: the machine's available memory, less where a cgroup limit (a container, a
    Colab-like envelope) or FLUXNB_HOST_MEMORY_GIB says less. File-backed pages count as free (they can be dropped)."""
    have = psutil.virtual_memory().available / GiB
    limits = [float(os.environ[HOST_MEMORY_ENV]) - proc_status().get("RssAnon", 0.0)] if os.environ.get(HOST_MEMORY_ENV) else []
    try:
        group = Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip()  # cgroup v2: "0::/path"
        root = Path(f"/sys/fs/cgroup{group}")
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
            limits.append((int(limit) - int(stat["anon"])) / GiB)
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return min([have, *limits])
