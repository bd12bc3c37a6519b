"""One base class for every error that is the user's to fix (bad input, missing step, wrong settings).

Its message says what is wrong and what to do. The CLI prints it as one line, without a traceback.
"""


class FluxnbError(Exception):
    """An error with a message meant for the person running fluxnb."""

    def _render_traceback_(self) -> list[str]:
        # IPython/Jupyter call this instead of printing the traceback: a notebook shows just the message.
        return [f"{type(self).__name__}: {self}"]
