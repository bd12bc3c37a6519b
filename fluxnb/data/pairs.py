"""A FLUX.1-Kontext-dev pair's control as far as checking the dataset needs it, shared by fluxnb.data.checks (notebook
01, before T5 loads) and fluxnb.data.controls (notebook 02, before the VAE loads), so both say the same thing:

    read_control(record, problems)      # its bytes, for the sample id (fluxnb.data.store.sample_id), or None
    unreadable(record, err)             # how a problem list names a control that cannot be read or decoded
    no_controls(problems, column)       # the one line naming the pairs without a usable control, and what to do

A control is part of the sample: two pairs with one target and one instruction but different inputs teach different
edits, and an edited control is new data (a resumed run must see that). So the id hashes its bytes too; decoding it
is left to notebook 02 (fluxnb.data.controls.check_controls), as only its bytes are needed here.
"""

from __future__ import annotations

from typing import Any

from ..base.errors import first_names
from ..config import KONTEXT

PAIRED = (f"choose a paired dataset: {KONTEXT} trains on (input image, instruction) -> result pairs (README, "
          f"'{KONTEXT}: image editing pairs')")


def where_controls(column: str) -> str:
    return (f"put each pair's input image at control/<the image's path> in the dataset folder (any image extension), "
            f"or in the Hub dataset's '{column}' column (data.control_column)")


def read_control(record: Any, problems: list[str]) -> bytes | None:
    """A fluxnb.data.sources.Record's control bytes; None, with the reason added to `problems`, when it has none
    or it cannot be read."""
    if record.control is None:
        problems.append(f"{record.source} (no control)")
        return None
    try:
        return record.control()
    except Exception as err:  # gone since it was listed, a Hub cell that is no image: this pair's problem
        problems.append(unreadable(record, err))
        return None


def unreadable(record: Any, err: Exception) -> str:
    """How a problem list names a pair whose control could not be read or decoded."""
    return f"{record.source} (control unreadable: {type(err).__name__})"


def no_controls(problems: list[str], column: str, *, unpaired: bool = False) -> str:
    """The pairs of `problems` (from read_control) in one line. unpaired: not one row has a control (a text-to-image
    dataset, say), so choosing a paired dataset is the likelier fix."""
    other = f", or {PAIRED}" if unpaired else ""
    return (f"{len(problems)} pair(s) have no usable control image: {first_names(problems)}. {KONTEXT} "
            f"learns to edit a control image into its target: {where_controls(column)}; or remove those images{other}.")
