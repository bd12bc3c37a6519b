"""The tiny profile's FLUX.1-Kontext-dev dataset: 8 pairs of (control, instruction) -> target, generated offline.

Each control is a subject of fluxnb.tiny.dataset drawn plain (grey shapes, thin black outlines, white ground, no
frame); its target is the same subject in the tiny style (fluxnb.tiny.dataset.draw: cream ground, burgundy frame,
palette fills, thick outlines); the caption is an instruction, "turn the sun into tnyst style". A LoRA trained on
it should learn the edit: the palette, the frame and the outlines put onto whatever drawing comes in.

Layout: the imagefolder one (targets + metadata.jsonl), with each control at control/<the target's name>, as
fluxnb.data.sources reads a Kontext dataset. One control is twice its target's size, so fitting a control to its
target's bucket (fluxnb.data.controls) is exercised.

Built on first use beside the tiny model (ensure_tiny_pairs), in a folder of its own with its own stamp, so the tiny
model and dataset (fluxnb.tiny.flux, TINY_VERSION) stay as they are. No second model is needed: the tiny model is a
FluxPipeline folder, and FluxKontextPipeline.from_pretrained loads the same components from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..base.files import build_into
from .dataset import _SIZE_OVERRIDES, DEFAULT_SIZE, SUBJECTS, TRIGGER_WORD, _Shape, draw
from .flux import tiny_root

PAIRS = 8  # the first 8 subjects of fluxnb.tiny.dataset
BIG_CONTROL = 3  # this pair's control is drawn at twice its target's size
PAIRS_VERSION = 1  # bump whenever build_pairs' output changes, so ensure_tiny_pairs rebuilds stale copies
STAMP_NAME = "tiny_pairs_stamp.json"
CONTROL_FOLDER = "control"  # fluxnb.data.sources.CONTROL_FOLDER (the data floor sits above this one)
VALIDATION_PROMPTS = [f"make it {TRIGGER_WORD} style", f"turn this drawing into {TRIGGER_WORD} style"]
GREY, WHITE, BLACK = (150, 150, 150), (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class TinyPairs:
    dataset: Path  # imagefolder layout + control/
    validation_prompts: list[str]


def instructions() -> list[str]:
    return [f"turn the {name} into {TRIGGER_WORD} style" for name, _, _ in SUBJECTS[:PAIRS]]


def plain(shapes: list[_Shape], size: tuple[int, int]) -> Image.Image:
    """The subject as a plain sketch: grey fills, thin black outlines, white ground, where draw() puts it."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    d = ImageDraw.Draw(img)
    b, lw = max(3, w // 16), max(2, w // 32)  # draw()'s frame and outline widths: the subject sits in the same box
    x0, y0, iw, ih = b + lw, b + lw, w - 2 * (b + lw), h - 2 * (b + lw)
    for kind, _, coords in shapes:
        pts = [round(x0 + v * iw) if i % 2 == 0 else round(y0 + v * ih) for i, v in enumerate(coords)]
        if kind == "line":
            d.line(pts, fill=BLACK, width=1)
        elif kind == "chord":
            d.chord(pts, 180, 360, fill=GREY, outline=BLACK)
        elif kind == "cutout":  # a bite out of a shape, in the ground's colour
            d.ellipse(pts, fill=WHITE)
        else:  # ellipse, rectangle, polygon
            getattr(d, kind)(pts, fill=GREY, outline=BLACK)
    return img


def save_pairs(folder: Path) -> None:
    """The targets and metadata.jsonl in `folder`, the controls in folder/control/; same call, same bytes."""
    (folder / CONTROL_FOLDER).mkdir(parents=True)
    rows = []
    for i, ((name, _, shapes), text) in enumerate(zip(SUBJECTS[:PAIRS], instructions())):
        file_name, size = f"{i:02d}_{name}.png", _SIZE_OVERRIDES.get(i, DEFAULT_SIZE)
        big = (2 * size[0], 2 * size[1]) if i == BIG_CONTROL else size
        draw(shapes, size).save(folder / file_name, format="PNG", optimize=False, compress_level=9)
        plain(shapes, big).save(folder / CONTROL_FOLDER / file_name, format="PNG", optimize=False, compress_level=9)
        rows.append(json.dumps({"file_name": file_name, "text": text}, sort_keys=True))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def build_pairs(out: str | Path) -> Path:
    """Write (overwriting) the paired dataset into `out`, its stamp last."""
    out = Path(out).expanduser().resolve()
    shutil.rmtree(out, ignore_errors=True)
    save_pairs(out)
    (out / STAMP_NAME).write_text(json.dumps({"version": PAIRS_VERSION}) + "\n")
    return out


def _is_current(root: Path) -> bool:
    try:
        return json.loads((root / STAMP_NAME).read_text()) == {"version": PAIRS_VERSION}
    except (OSError, ValueError):
        return False


def pairs_root() -> Path:
    """Where the paired dataset lives: beside the tiny model's folder (fluxnb.tiny.flux.tiny_root)."""
    return tiny_root().parent / "tiny-pairs"


def ensure_tiny_pairs(root: str | Path | None = None) -> TinyPairs:
    """The cached paired dataset, built first if missing or stale (built aside, renamed into place)."""
    root = pairs_root() if root is None else Path(root).expanduser().resolve()
    if not _is_current(root):
        shutil.rmtree(root, ignore_errors=True)  # outdated or partial: only fluxnb's own files live there
        build_into(root, build_pairs, _is_current)
    return TinyPairs(root, list(VALIDATION_PROMPTS))
