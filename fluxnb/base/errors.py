"""One base class for every error that is the user's to fix (bad input, missing step, wrong settings).

Its message says what is wrong and what to do. The CLI prints it as one line, without a traceback.
"""


SHOW = 5  # how many offending rows, files or pairs a message names before "... and N more"


def first_names(items: list[str]) -> str:
    """'a, b, c, d, e ... and 3 more': the first SHOW of `items`, for a one-line message that names them."""
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


class FluxnbError(Exception):
    """An error with a message meant for the person running fluxnb."""

    def _render_traceback_(self) -> list[str]:
        # IPython/Jupyter call this instead of printing the traceback: a notebook shows just the message.
        return [f"{type(self).__name__}: {self}"]
