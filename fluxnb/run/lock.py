"""One writer per run directory: an OS file lock on RUN/.lock, held while a step writes.

    with hold(run.root / ".lock", "train"):     # fluxnb.run.RunDir.writing / the @writes decorator
        ...                                      # a second process gets RunBusy, naming this PID

Two `train` processes on one run (or two notebooks, or a notebook and the CLI) would delete each other's
checkpoints and interleave metrics.jsonl. The lock is `fcntl.flock` on RUN/.lock: the operating system drops it
when its process ends, however it ends (Ctrl-C, SIGKILL, a Colab VM gone), so a stale lock can never block a run;
the file keeps the last holder's PID and step, so the next holder can say it took over from a killed run. Within
one process the lock is re-entrant (the CLI holds it around `train`, which takes it too; a notebook re-running a
cell takes and drops it per call): steps of one process never wait on each other.

A filesystem without flock (some network mounts) cannot lock: fluxnb says so once and goes on unlocked. The lock
is per machine: two VMs writing one Drive folder are not stopped by it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..base.errors import FluxnbError

try:
    import fcntl
except ImportError:  # Windows: no flock; fluxnb runs unlocked there (see _lock)
    fcntl = None

_HELD: dict[Path, list] = {}  # resolved lock file -> [fd, depth]: the locks this process holds
_WARNED: set[Path] = set()
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # the filesystem cannot lock


class RunBusy(FluxnbError):
    """Another process is writing this run directory now."""


class RunReadOnly(FluxnbError):
    """The run directory cannot be written (a read-only mount, no permission): no step that writes can run there."""


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _busy(path: Path, holder: dict, what: str) -> RunBusy:
    pid = holder.get("pid", "?")
    since = time.strftime("%H:%M", time.localtime(holder["since"])) if "since" in holder else "?"
    return RunBusy(f"{path.parent} is being written by another process (PID {pid} on {holder.get('host', '?')}, "
                   f"{holder.get('step', '?')} since {since}), so {what} cannot run now: wait until it ends, or "
                   f"stop it (interrupt that notebook's kernel, or `kill {pid}`), then run this again; or use "
                   "another run directory. Reading the run (samples, checkpoints) is fine meanwhile.")


def _lock(path: Path, what: str) -> int | None:
    """Open and flock `path` (no waiting); the fd, or None when this filesystem cannot lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file where a folder should be
            raise FluxnbError(f"the run directory {path.parent} is a file, or inside one, not a folder: give a folder "
                              "(--run-dir, FLUXNB_RUN_DIR); fluxnb creates it if it does not exist.") from None
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise RunReadOnly(f"{path.parent} cannot be written ({os.strerror(err.errno)}), so {what} cannot run there: "
                          "give a run directory you can write (--run-dir, FLUXNB_RUN_DIR; copy this one there to "
                          "carry on with it). Reading it works as it is, e.g. `export --out` to another folder.") from None
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no fcntl")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise _busy(path, holder, what) from None
        os.close(fd)
        if err.errno not in _NO_FLOCK:
            raise
        if path not in _WARNED:
            _WARNED.add(path)
            print(f"note: {path.parent} is on a filesystem without file locks: make sure only one notebook or "
                  "command writes this run at a time.")
        return None
    previous = _holder(fd)
    if previous.get("pid") not in (None, os.getpid()):  # a holder that ended without releasing: killed
        print(f"fluxnb: {path.parent} was locked by PID {previous['pid']} ({previous.get('step')}), which ended "
              "without releasing it (killed?); taking the lock over.")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "step": what, "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # an empty file: the lock was released, not left behind by a killed process
    os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def hold(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` for the block (re-entrant in this process); RunBusy if another process has it."""
    if os.environ.get("RANK", "0") not in ("", "0"):  # a worker of `accelerate launch`: rank 0 holds it for all
        yield
        return
    key = Path(path).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = _lock(key, what)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        _unlock(fd)


def holder(path: str | Path) -> dict | None:
    """{"pid", "host", "step", "since"} of the process holding `path` now, or None (nobody, or no lock support)."""
    path = Path(path)
    if fcntl is None or not path.is_file() or path.resolve() in _HELD:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return _holder(fd) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)
    return None
