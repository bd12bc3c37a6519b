"""Progress bars that read finished wherever a notebook is read, not only where its widgets run.

In a notebook tqdm.auto draws a widget; the notebook also saves, for viewers that cannot show widgets (GitHub,
nbconvert's HTML, the JSON itself), the text the bar had when it appeared: "checking images: 0%| 0/16". `Bar` is
the same widget, shown with a display id, and when it closes it replaces that text with its last line
("checking images: 100%| 16/16 [00:03<00:00]"), or with nothing for a bar that was not to be left (leave=False).
A stopped bar keeps the line it stopped at. Outside notebooks it is tqdm's text bar, unchanged.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# tqdm.auto picked its widget class at import (an IPython kernel with ipywidgets), or the text bar.
_WIDGET = "tqdm.notebook" in sys.modules and issubclass(tqdm, sys.modules["tqdm.notebook"].tqdm_notebook)


class Bar(tqdm):
    """tqdm.auto's bar; as a widget its saved text ends as its last line (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        self._shown = None
        show = _WIDGET and kwargs.pop("display", True)
        if _WIDGET:
            kwargs["display"] = False  # shown below, with a display id that close() can update
        super().__init__(*args, **kwargs)
        if show and not self.disable and self.delay <= 0:
            from IPython.display import display

            self._shown = display(self.container, display_id=True)
            self.displayed = True

    def close(self) -> None:
        super().close()
        shown, self._shown = getattr(self, "_shown", None), None
        if shown is None:
            return
        if self.leave or (self.total and self.n < self.total):  # finished and kept, or stopped: its last line
            shown.update(self.container)
        else:  # a passing bar: the widget hid itself, the text goes too
            shown.update({"text/plain": ""}, raw=True)
