"""The review-and-edit table of notebook 01: each image with its caption in a text box you can change.

    table = caption_table(plan)     # fluxnb.data.captions.CaptionPlan, after caption_folder
    display(table)                  # edit; every change goes into plan.rows at once
    captions.write_metadata(plan)   # the next cell writes the folder's metadata.jsonl, with your edits

The table edits the plan, like fluxnb.nb.widgets' forms edit a config: the plan stays the truth, and nothing is
written until you say so. Headless (nbval, CLI) it is simply displayed.
"""

from __future__ import annotations

import html
import io

import ipywidgets as W
from PIL import Image

from ..data.captions import CaptionPlan

THUMB = 96  # pixels, the longer side of each thumbnail


def _thumbnail(path) -> bytes:
    image = Image.open(path).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _row(plan: CaptionPlan, index: int, new: bool) -> W.HBox:
    row = plan.rows[index]
    box = W.Textarea(value=str(row.get(plan.column) or ""), layout=W.Layout(width="560px", height="60px"))

    def on_change(change: dict) -> None:
        row[plan.column] = change["new"].strip()

    box.observe(on_change, names="value")
    label = W.HTML(f"<small>{html.escape(plan.files[index])}<br>{'new' if new else 'yours'}</small>",
                   layout=W.Layout(width="140px"))
    return W.HBox([W.Image(value=_thumbnail(plan.folder / plan.files[index]), format="png"), label, box])


def caption_table(plan: CaptionPlan, *, limit: int | None = 50) -> W.VBox:
    """One row per metadata row naming an image (the first `limit`, new captions first): thumbnail, file name,
    editable caption. Rows naming no image in the folder are not shown, and are written back as they were."""
    order = list(plan.todo) + [i for i in plan.files if i not in set(plan.todo)]
    shown = order[:limit] if limit else order
    more = f" (first {len(shown)} of {len(order)})" if len(shown) < len(order) else ""
    header = W.HTML(f"<b>Captions{more}</b>: edit any box, then run the next cell to save them.")
    return W.VBox([header, *[_row(plan, i, i in plan.todo) for i in shown]])
