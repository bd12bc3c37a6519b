"""The notebook series as its reader gets it: executed headless by fluxnb's own runner (what
`python -m fluxnb notebooks` does) on the tiny profile, then checked from the executed copies themselves.

`python3 -m pytest` runs the series once, here; nbval still runs it cell by cell when asked for alone
(`python3 -m pytest notebooks`; see conftest.py).
"""

from __future__ import annotations

import json
import re

import pytest

from fluxnb.nb.runner import notebook_paths, run_notebooks

# Lines that once came with every notebook and say nothing about its work (fluxnb/__init__.py drops them).
NOISE = [
    "Failed to load ",  # torchao's CUDA kernels on a CPU build of torch
    "is an Enum subclass and is now natively supported by torch.compile",  # torch pytree, via torchao
    "Unable to import `torchao` Tensor objects",  # diffusers 0.42 vs torchao 0.18
    "requires torchvision (not installed); falling back to",  # transformers' image processors, never used here
    "Kernel is running over TCP without encryption",
    "freed 0.00 GiB of GPU memory",
]
# Sections (the first line of the markdown cell above a code cell) whose prose promises a figure or an image.
PROMISED = {
    "01": ["## Look at what the model will be trained on"],
    "02": ["## The round trip"],
    "03": ["## Train", "## Did it learn?"],
    "04": ["## Base model vs LoRA", "After editing the form", "## What the scale does", "## Blend several LoRAs",
           "## Reload the merged model in NF4"],
}
# Code that makes a figure must show it, wherever it is (also in cells added later).
DRAWS = re.compile(r"\b(image_grid|save_grid|loss_plot)\(|display\(Image\(")
MAX_BARS = 4  # progress bars one cell may print
BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "3/16 [00:01<00:02, ...]"


@pytest.fixture(scope="module")
def executed(tmp_path_factory, monkeypatch_module) -> dict[str, dict]:
    monkeypatch_module.delenv("TQDM_DISABLE", raising=False)  # count the bars a user sees
    run_dir = tmp_path_factory.mktemp("series") / "run"
    assert run_notebooks(run_dir) == 0, "a notebook failed: see the output above"
    return {p.name[:2]: json.loads((run_dir / "executed" / p.name).read_text()) for p in notebook_paths()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _code_cells(nb: dict) -> list[tuple[str, dict]]:
    """(first line of the prose above, code cell) for every code cell."""
    cells, heading = [], ""
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            heading = "".join(cell["source"]).strip().splitlines()[0]
        elif cell["cell_type"] == "code":
            cells.append((heading, cell))
    return cells


def _texts(cell: dict) -> list[str]:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append("".join(o["text"]))
        elif o["output_type"] in ("display_data", "execute_result"):
            out.append("".join(o["data"].get("text/plain", "")))
        elif o["output_type"] == "error":
            out.append("Traceback: " + o["ename"])
    return out


def _images(cell: dict) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


NAMES = sorted(PROMISED) + ["05"]


@pytest.mark.parametrize("name", NAMES)
def test_every_promised_figure_is_shown(executed, name):
    missing = []
    for heading, cell in _code_cells(executed[name]):
        promised = any(heading.startswith(p) for p in PROMISED.get(name, []))
        if (promised or DRAWS.search("".join(cell["source"]))) and not _images(cell):
            missing.append(heading)
    found = {h for h, _ in _code_cells(executed[name])}
    assert all(any(h.startswith(p) for h in found) for p in PROMISED.get(name, [])), "a promised section is gone"
    assert not missing, f"{name}: no figure under {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_no_traceback_and_no_noise(executed, name):
    bad = [(h, t[:200]) for h, cell in _code_cells(executed[name]) for t in _texts(cell)
           if "Traceback" in t or any(n in t for n in NOISE)]
    assert not bad, bad


@pytest.mark.parametrize("name", NAMES)
def test_progress_bars_are_few_and_labelled(executed, name):
    for heading, cell in _code_cells(executed[name]):
        bars = [t for t in _texts(cell) if BAR.search(t)]
        assert len(bars) <= MAX_BARS, f"{name} '{heading}': {len(bars)} progress bars"
        unlabelled = [b for b in bars if re.match(r"\s*\d+%\|", b.split("\r")[-1])]
        assert not unlabelled, f"{name} '{heading}': a progress bar without a label: {unlabelled[0]!r}"


def test_the_model_card_is_shown_once(executed):
    text = "\n".join(t for _, cell in _code_cells(executed["05"]) for t in _texts(cell))
    assert text.count("## Trigger word") <= 1 and text.count("library_name: diffusers") == 1
