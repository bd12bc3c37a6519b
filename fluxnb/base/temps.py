"""Temporaries: what fluxnb writes beside a file or folder before it takes its place, and what a killed run left.

An exception removes a temporary (fluxnb.base.files.atomic_path, temp_folder below), but a SIGKILL, the kernel's
out-of-memory killer or a Colab VM gone cannot: the temporary stays, and for a merged model it is the size of the
model (~23 GB in 16-bit). So every temporary is named after its target and the process writing it,

    .metadata.jsonl.4242-k3j2h1g0.tmp     a file's:   .<target>.<pid>-<random>.tmp
    .transformer-4242-k3j2h1g0/           a folder's: .<target>-<pid>-<random>, holding the marker file MARK
    .transformer-4242-k3j2h1g0.old/       the folder it replaces, on its way out (marked too)

and the next step that writes the same folder removes the ones whose writer is gone: its PID runs no process, or
a process started after the temporary was last written (the PID was reused); never one this process is writing
now. Nothing else is ever removed: a name fluxnb does not make, or a folder without the marker, stays.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

MARK = ".fluxnb-temp"  # in every folder that temp_folder makes: only a marked folder is ever removed
_FILE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
_LEGACY_FILE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")  # fluxnb before the PID was in the name
_LIVE: set[str] = set()  # the temporaries this process is writing now (absolute paths)
_SLACK = 2.0  # seconds: process start times are rounded down to whole seconds of the boot time


def _started(pid: int | None = None) -> float | None:
    """When process `pid` (this one by default) started, or None when there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def abandoned(path: Path, pid: int | None) -> bool:
    """True when nobody writes the temporary `path` any more: its writer `pid` has ended (or the PID is another
    process's now), or, without a PID (older fluxnb), it was last written before this process started."""
    try:
        written = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if pid is None:
        return written < (_started() or time.time()) - _SLACK
    if pid == os.getpid():
        return os.path.abspath(path) not in _LIVE
    started = _started(pid)
    return started is None or started > written + _SLACK


@contextlib.contextmanager
def live(path: Path) -> Iterator[Path]:
    """Mark `path` as being written by this process for the block: no sweep of this process removes it."""
    key = os.path.abspath(path)
    _LIVE.add(key)
    try:
        yield path
    finally:
        _LIVE.discard(key)


def file_prefix(target: Path) -> str:
    """The start of a temporary file's name for `target` (tempfile.mkstemp adds the random part)."""
    return f".{target.name}.{os.getpid()}-"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("s" if n != 1 else "")


def remove_abandoned_files(folder: Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files that a killed write left in `folder`: only those for a file named in `targets`
    (all of fluxnb's names when None: a folder fluxnb owns, such as RUN/latents). Says so in one line."""
    wanted = None if targets is None else set(targets)
    gone = []
    for path in sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []:
        match = _FILE.match(path.name) or _LEGACY_FILE.match(path.name)
        if not match or (wanted is not None and match["target"] not in wanted) or not path.is_file():
            continue
        pid = int(match["pid"]) if "pid" in match.groupdict() else None
        if abandoned(path, pid):
            path.unlink(missing_ok=True)
            gone.append(path)
    if gone:
        print(f"fluxnb: removed {_count(len(gone), 'temporary file')} that a stopped write left in {folder} "
              f"({', '.join(p.name for p in gone[:3])}{', ...' if len(gone) > 3 else ''}).")
    return gone


@contextlib.contextmanager
def temp_folder(target: Path) -> Iterator[Path]:
    """A new, marked folder beside `target` for the block; removed after it unless replace_folder put it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    with live(tmp):
        try:
            (tmp / MARK).write_text(f"fluxnb writes {target.name} here, then renames it; a stopped one is removed\n")
            yield tmp
        finally:
            remove_folder(tmp)


def remove_folder(path: Path) -> None:
    """Remove a marked folder, its marker last: a kill midway leaves a folder that is still known to be fluxnb's."""
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        if child.name != MARK:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
    (path / MARK).unlink(missing_ok=True)
    path.rmdir()


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` (from temp_folder) in place of `target`. Two renames, no copy: at every instant
    `target` is the old folder whole, the new one whole, or missing while the old one waits beside it as
    `.<tmp>.old` and the new one as `tmp` (recover_folder then finishes the swap)."""
    with live(tmp.with_name(tmp.name + ".old")) as aside:
        if target.exists():
            (target / MARK).write_text("fluxnb replaced this folder; a stopped swap leaves it to be removed\n")
            target.rename(aside)
        try:
            tmp.rename(target)
        except BaseException:
            if aside.exists() and not target.exists():
                aside.rename(target)  # the old one back, before temp_folder removes the new one
            raise
        finally:
            (target / MARK).unlink(missing_ok=True)
        remove_folder(aside)


def _folders(target: Path) -> list[Path]:
    """The marked temporaries of `target` whose writer is gone (an empty one too: a kill before its marker)."""
    name = re.compile(rf"^\.{re.escape(target.name)}-(?P<pid>\d+)-[a-z0-9_]{{8}}(\.old)?$")
    found = []
    for path in sorted(target.parent.glob(f".{target.name}-*")) if target.parent.is_dir() else []:
        match = name.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and ((path / MARK).is_file() or not any(path.iterdir())):
            if abandoned(path, int(match["pid"])):
                found.append(path)
    return found


def recover_folder(target: Path, complete: Callable[[Path], bool], also: Iterable[Path] = ()) -> str | None:
    """Finish the swap a killed replace_folder left (`target` missing: the newest `complete` temporary takes its
    place), and remove the other temporaries of `target` that nobody writes (and the folders `also`, which the
    caller knows to be abandoned); one line saying what was done, or None."""
    temps, said = _folders(target), []
    if not target.exists():  # the new folder if it was finished, else the old one, which is whole until then
        done = sorted((t for t in temps if t.name.endswith(".old") or complete(t)),
                      key=lambda t: (t.name.endswith(".old"), -t.stat().st_mtime))
        if done:
            done[0].rename(target)
            (target / MARK).unlink(missing_ok=True)
            temps.remove(done[0])
            said.append(f"finished putting {target} in place (a run was stopped while it swapped folders)")
    temps += list(also)
    if temps:
        size = sum(f.stat().st_size for t in temps for f in t.rglob("*") if f.is_file())
        for temp in temps:
            remove_folder(temp)
        said.append(f"removed {_count(len(temps), 'unfinished temporary folder')} ({size / 2**30:.2f} GiB) that a "
                    f"stopped run left beside {target}")
    return f"fluxnb: {'; '.join(said)}." if said else None
