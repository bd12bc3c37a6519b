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
_TRIES = 10  # ~0.5 s: a holder that has not written its name yet, or is releasing the lock, is usually done by then


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
    """RunBusy naming the holder; one caught taking or releasing the lock has not written its name (yet)."""
    pid, who, stop = holder.get("pid"), "another process", "interrupt that notebook or command"
    if pid is not None:
        since = time.strftime(" since %H:%M", time.localtime(holder["since"])) if "since" in holder else ""
        who += f" (PID {pid} on {holder.get('host', 'this machine')}, {holder.get('step', 'a step')}{since})"
        stop = f"interrupt that notebook's kernel, or `kill {pid}`"
    return RunBusy(f"{path.parent} is being written by {who}, so {what} cannot run now: wait until it ends, or "
                   f"stop it ({stop}), then run this again; or use another run directory. Reading the run "
                   "(samples, checkpoints) is fine meanwhile.")


def _open(path: Path, what: str) -> int:
    """The lock file, opened for writing (created with its folder if need be); one line when that cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file where a folder should be
            raise FluxnbError(f"the run directory {path.parent} is a file, or inside one, not a folder: give a folder "
                              "(--run-dir, FLUXNB_RUN_DIR); fluxnb creates it if it does not exist.") from None
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise RunReadOnly(f"{path.parent} cannot be written ({os.strerror(err.errno)}), so {what} cannot run there: "
                          "give a run directory you can write (--run-dir, FLUXNB_RUN_DIR; copy this one there to "
                          "carry on with it). Reading it works as it is, e.g. `export --out` to another "
                          "folder.") from None


def _flock(fd: int, path: Path, what: str) -> bool:
    """flock `fd` without waiting: True; False when this filesystem cannot lock; RunBusy naming the holder."""
    for _ in range(_TRIES):
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in _NO_FLOCK:
                return False
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        holder = _holder(fd)
        if holder:
            raise _busy(path, holder, what)
        time.sleep(0.05)  # an empty lock file: its holder is taking or releasing the lock this moment
    raise _busy(path, {}, what)


def _lock(path: Path, what: str) -> int | None:
    """Open and flock `path` (no waiting); the fd, or None when this filesystem cannot lock."""
    fd = _open(path, what)
    try:
        locked = _flock(fd, path, what)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
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
