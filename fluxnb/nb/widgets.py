"""ipywidgets forms that edit a config dataclass in place: the form changes values, the dataclass stays the truth.

    form = fluxnb.nb.widgets.config_form(run.config.data, ["dataset", "width", "height"], "Dataset")
    display(form)            # edit, then run the next cell: run.config.data already holds the new values

Every change is validated by building a copy of the dataclass; a bad value is shown in red under the form and
the dataclass keeps its last good value. Headless (nbval, CLI) the form is simply displayed with the defaults.
"""

from __future__ import annotations

import dataclasses
import html
import typing
from typing import Any

import ipywidgets as W

from ..base.errors import FluxnbError

_STYLE = {"description_width": "200px"}
_LAYOUT = W.Layout(width="520px")


def _widget_for(name: str, value: Any, hint: Any, choices: tuple[str, ...] | None) -> W.Widget:
    label = name.replace("_", " ")
    common = {"description": label, "style": _STYLE, "layout": _LAYOUT}
    if choices:
        return W.Dropdown(options=list(choices), value=value, **common)
    if isinstance(value, bool):
        return W.Checkbox(value=value, indent=False, **common)
    if isinstance(value, int):
        return W.IntText(value=value, **common)
    if isinstance(value, float):
        return W.FloatText(value=value, **common)
    if isinstance(value, list):
        return W.Textarea(value="\n".join(map(str, value)), placeholder="one per line", **common)
    return W.Text(value="" if value is None else str(value), **common)


def _parse(widget: W.Widget, old: Any) -> Any:
    value = widget.value
    if isinstance(old, list):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if old is None and value == "":
        return None
    return value


def config_form(obj: Any, fields: list[str] | None = None, title: str = "", *,
                choices: dict[str, tuple[str, ...]] | None = None, check=None) -> W.VBox:
    """A form for some `fields` of dataclass `obj`; each valid edit is written back to `obj` immediately.
    check(candidate): what is wrong with an edited copy beyond its own validation (another section's settings), or
    None."""
    names = fields or [f.name for f in dataclasses.fields(obj)]
    hints = typing.get_type_hints(type(obj))
    choices = choices or {}
    message = W.HTML()
    rows = []
    for name in names:
        widget = _widget_for(name, getattr(obj, name), hints.get(name), choices.get(name))

        def on_change(change: dict, name: str = name, widget: W.Widget = widget) -> None:
            try:
                new = _parse(widget, getattr(obj, name))
                candidate = dataclasses.replace(obj, **{name: new})  # runs __post_init__: validates, obj untouched
                if check is not None and (problem := check(candidate)):
                    raise FluxnbError(problem)
            except (FluxnbError, ValueError, TypeError) as err:
                message.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
                return
            setattr(obj, name, new)
            message.value = ""

        widget.observe(on_change, names="value")
        rows.append(widget)
    header = [W.HTML(f"<b>{title}</b>")] if title else []
    return W.VBox([*header, *rows, message])
