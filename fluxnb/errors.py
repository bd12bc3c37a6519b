"""One base class for every error that is the user's to fix (bad input, missing step, wrong settings).

Its message says what is wrong and what to do. The CLI prints it as one line, without a traceback.
"""


class FluxnbError(Exception):
    """An error with a message meant for the person running fluxnb."""
