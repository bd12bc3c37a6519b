"""Ctrl-C is never lost: a watch that remembers a SIGINT, for code that must not run on after one.

    @watching_interrupts          # the CLI's main (from its first line), and train() in a notebook
    def main(...): ...
    check_interrupted()           # before anything destructive, and at every training step
    interrupt_handled()           # where a KeyboardInterrupt is caught and answered (train's "interrupted at step N")
    exit_on_interrupt(code)       # `python -m fluxnb`: after main, a Ctrl-C during the interpreter's shutdown

A SIGINT that lands inside some object's __del__ (the regex module's Group.__del__ while a tokenizer or
torch.compile cleans up), a weakref finalizer or an atexit callback (torch.library's, at exit) is printed as
"Exception ignored in ... KeyboardInterrupt" and lost: the program would run on, `train --overwrite` would delete
the earlier run, and a command would exit 0. Under a watch the Ctrl-C is still raised at once where it can be,
and remembered: `check_interrupted()` raises it again where it was swallowed, and so does the watched call when
it returns, unless the call answered it itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable


class Interrupts:
    """The handler of one watch: raises KeyboardInterrupt as usual, and remembers that it came."""

    def __init__(self) -> None:
        self.hit = False

    def handler(self, signum, frame) -> None:
        self.hit = True
        if frame is not None and frame.f_code.co_name == "__del__":
            return  # raising here would be swallowed; the next check() raises it
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            self.hit = False  # raised again once; whoever catches it now answers it
            raise KeyboardInterrupt


_WATCHING: list[Interrupts] = []  # the active watch (innermost last)


def watching_interrupts(fn: Callable) -> Callable:
    """Decorator: SIGINT goes to an Interrupts for the whole call (main thread, default handler only). Nested
    inside another watch (the CLI's, around train), the outer one goes on watching. A Ctrl-C swallowed after the
    call's last check (in a __del__ as train's objects are freed) is raised when the call returns."""
    @functools.wraps(fn)
    def watched(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() or (
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return fn(*args, **kwargs)  # someone else handles Ctrl-C here, or it cannot be replaced off the main thread
        watch = Interrupts()
        _WATCHING.append(watch)
        signal.signal(signal.SIGINT, watch.handler)
        try:
            result = fn(*args, **kwargs)
            watch.check()
            return result
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _WATCHING.remove(watch)
    return watched


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived (and was perhaps swallowed) since the watch began."""
    if _WATCHING:
        _WATCHING[-1].check()


def interrupt_handled() -> None:
    """Where a KeyboardInterrupt is caught and answered (train says where the run stands and returns): the
    watch need not raise it again when the call returns."""
    if _WATCHING:
        _WATCHING[-1].hit = False


def exit_on_interrupt(code: int) -> None:
    """sys.exit(code), where a Ctrl-C from now on ends the process at once with "interrupted" and status 130.

    For `python -m fluxnb` once main returned: during the interpreter's shutdown (atexit callbacks, finalizers) a
    KeyboardInterrupt is printed as "Exception ignored ..." and the process exits 0, as if the command had not been
    stopped. Everything the command wrote is in place by then; only the clean-up is cut short."""
    def stop(signum, frame) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, stop)
    sys.exit(code)
