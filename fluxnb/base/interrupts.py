"""Ctrl-C is never lost: a watch that remembers a SIGINT, for code that must not run on after one.

    @watching_interrupts          # the CLI's main (from its first line), and train() in a notebook
    def main(...): ...
    check_interrupted()           # before anything destructive, and at every training step

A SIGINT that lands inside some object's __del__ (the regex module's Group.__del__ while a tokenizer or
torch.compile cleans up) is printed as "Exception ignored in ... Group.__del__ ... KeyboardInterrupt" and lost:
the program would run on, and `train --overwrite` would delete the earlier run. Under a watch the Ctrl-C is still
raised at once where it can be, and remembered, so `check_interrupted()` raises it again where it was swallowed.
"""

from __future__ import annotations

import functools
import signal
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
            raise KeyboardInterrupt


_WATCHING: list[Interrupts] = []  # the active watch (innermost last)


def watching_interrupts(fn: Callable) -> Callable:
    """Decorator: SIGINT goes to an Interrupts for the whole call (main thread, default handler only). Nested
    inside another watch (the CLI's, around train), the outer one goes on watching."""
    @functools.wraps(fn)
    def watched(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() or (
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return fn(*args, **kwargs)  # someone else handles Ctrl-C here, or it cannot be replaced off the main thread
        watch = Interrupts()
        _WATCHING.append(watch)
        signal.signal(signal.SIGINT, watch.handler)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _WATCHING.remove(watch)
    return watched


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived (and was perhaps swallowed) since the watch began."""
    if _WATCHING:
        _WATCHING[-1].check()
