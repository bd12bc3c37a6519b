"""Files in a run directory: written whole or not at all, and safetensors read without holding the file open.

Everything fluxnb writes goes through `atomic_path`: write to a temporary file in the same folder, flush it to
disk, then rename it over the target (a rename is atomic on POSIX and Windows), so a crash or a Colab
disconnect mid-write never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load, save

_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it) ...
os.umask(_UMASK)  # ... and put it back


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it replaces `path`, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; other tools (ComfyUI, a team) must read it
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written atomically (tensors moved to the CPU and made contiguous first)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    # Read the bytes ourselves: a memory-mapped file would stay open and block deletes on Windows and Drive.
    return load(Path(path).read_bytes())


def tensors_metadata(path: Path) -> dict[str, str] | None:
    """The string metadata of a safetensors file (header only), or None if it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # missing, truncated, not safetensors: all mean "compute it again"
        return None
