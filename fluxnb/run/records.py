"""The run's small records, each with its one owner here: metrics.jsonl (one line per optimizer step, written by
training, read by validation and the model card) and the gallery's prompts.json (written by notebook 04, read by
notebook 05's card).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base.files import atomic_path, atomic_write_text, disk_errors

GALLERY_INDEX = "prompts.json"  # RUN/samples/final/prompts.json: file, prompt, seed, steps, scales per image


class MetricsLog:
    """RUN/metrics.jsonl: one JSON line per optimizer step. Appended line by line (a crash can cut only the last
    line, which `read` skips); on resume the lines after the checkpoint's step are dropped first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return rows

    def truncate(self, after_step: int) -> list[dict[str, Any]]:
        """Keep only the rows up to `after_step` (rewritten atomically); return them."""
        rows = [r for r in self.read() if r.get("step", 0) <= after_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rows

    def append(self, row: dict[str, Any]) -> None:
        with disk_errors(self.path.parent), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()


def write_gallery_index(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """folder/prompts.json: one row per gallery image (file, prompt, seed, steps, lora_scale, guidance_scale; Kontext:
    input, the file of the image it edited)."""
    atomic_write_text(folder / GALLERY_INDEX, json.dumps(rows, indent=2) + "\n")
    return folder / GALLERY_INDEX


def read_gallery_index(folder: Path) -> list[dict[str, Any]]:
    """The rows write_gallery_index wrote, or [] when there is no gallery yet."""
    index = folder / GALLERY_INDEX
    return json.loads(index.read_text()) if index.is_file() else []
