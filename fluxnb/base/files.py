"""Files in a run directory: written whole or not at all, and safetensors read without holding the file open.

Everything fluxnb writes goes through `atomic_path`: write to a temporary file in the same folder, flush it to
disk, then rename it over the target (a rename is atomic on POSIX and Windows), so a crash or a Colab
disconnect mid-write never leaves a half-written file behind (the temporary a kill leaves is removed by the next
step writing that folder: fluxnb.base.temps). A full disk or an I/O error (ENOSPC, EIO, ...) while
writing becomes one DiskError naming the folder and the space needed; the temporary file is removed, and the
files written before are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FluxnbError
from .temps import file_prefix, live

if TYPE_CHECKING:  # torch is imported where tensors are written: config (and the CLI's --help) need none of it
    import torch

_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it) ...
os.umask(_UMASK)  # ... and put it back


_DISK_TROUBLE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                 errno.EIO: "an input/output error (a failing disk, or a network drive that dropped)",
                 errno.EROFS: "the filesystem is read-only", errno.EFBIG: "the file is too large for this filesystem"}


class DiskError(FluxnbError):
    """A write failed because of the disk (full, quota, I/O error): nothing written before it was lost."""


_OPEN: list[Path] = []  # the disk_errors blocks open now: the outermost one names the folder


def _size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KiB"


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`: itself, or the one a library wrapped (torch.save turns a failed write into
    RuntimeError "unexpected pos ...", raised while handling the OSError)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


@contextlib.contextmanager
def disk_errors(folder: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a disk-level OSError (full, quota, EIO, read-only) raised in the block, or wrapped by a library, into
    one DiskError. Nested, the outermost block speaks (e.g. checkpoints/ and the checkpoint's size, not one file in
    step-N.tmp/)."""
    _OPEN.append(Path(folder))
    try:
        yield
    except Exception as raised:
        err = _os_error(raised)
        if err is None or err.errno not in _DISK_TROUBLE or len(_OPEN) > 1:
            raise
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
        need = f"it needs about {_size(needed)}, " if needed else ""
        left = f"{_size(free)} free" if free is not None else "free space unknown"
        raise DiskError(f"could not write to {folder}: {_DISK_TROUBLE[err.errno]} ({need}{left}). Nothing "
                        "already written was lost: free some space (or move the run directory, FLUXNB_RUN_DIR, to a "
                        "bigger disk), then run the same step again; it carries on from what is there.") from err
    finally:
        _OPEN.pop()


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it replaces `path`, else it is removed.
    `needed`: the bytes to be written, if known, for the message when the disk is full."""
    path = Path(path)
    with disk_errors(path.parent, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=file_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        with live(Path(tmp)) as tmp_path:  # named after this process: a kill's leftover is found (fluxnb.base.temps)
            try:
                yield tmp_path
                with open(tmp_path, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; other tools (ComfyUI, a team) must read it
                os.replace(tmp_path, path)
            finally:
                tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written atomically (tensors moved to the CPU and made contiguous first)."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

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


class ShardWriter:
    """Tensors in, safetensors shards of ~`shard_bytes` out (diffusers' names and index), so that at most one
    shard is in RAM (fluxnb.infer.merge streams a model through it)."""

    def __init__(self, folder: Path, shard_bytes: float) -> None:
        self.folder, self.shard_bytes, self.pending, self.files, self.index = folder, shard_bytes, {}, [], {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending |= {k: v.contiguous() for k, v in tensors.items()}
        if sum(t.nbytes for t in self.pending.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            name = f"part-{len(self.files):05d}.safetensors"
            save_file(self.pending, self.folder / name, metadata={"format": "pt"})
            self.files.append(name)
            self.index |= {k: name for k in self.pending}
            self.pending = {}

    def close(self) -> None:
        """Rename the parts as diffusers names shards (one file: no index) and write the index."""
        self.flush()
        stem, n = "diffusion_pytorch_model", len(self.files)
        final = {f: f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
                 for i, f in enumerate(self.files)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        if n > 1:
            size = sum((self.folder / f).stat().st_size for f in final.values())
            index = {"metadata": {"total_size": size}, "weight_map": {k: final[f] for k, f in sorted(self.index.items())}}
            (self.folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_into(root: Path, build: Callable[[Path], object], is_current: Callable[[Path], bool]) -> None:
    """`build(folder)` in a temporary folder beside `root`, then rename it into place, so that concurrent callers
    never see half a build; if another process won the race (its build is identical), theirs stays."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build(tmp)
        try:
            tmp.rename(root)
        except OSError:
            if not is_current(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
