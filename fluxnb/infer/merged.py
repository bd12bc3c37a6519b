"""The merged model's folder on disk (notebook 04): when it is complete, and what a stopped merge leaves to repair.

fluxnb.infer.merge builds a new merged/transformer/ beside the old one and swaps it in by two renames, its
merge.json (the base, the LoRA and its hash) written inside, last: at every moment the folder holds the whole old
merge or the whole new one. `repair` finishes or undoes what a kill cut short.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..base.temps import abandoned, recover_folder

MERGE_INFO = "merge.json"  # in merged/transformer/, swapped in with the weights: base, LoRA (and its hash), dtype
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_OUTPUT = re.compile(rf"part-\d{{5}}\.safetensors|config\.json|{_WEIGHTS[:-12]}(-\d{{5}}-of-\d{{5}})?\.safetensors"
                     r"(\.index\.json)?")  # every file name the merge writes
_LEGACY_TEMP = re.compile(r"\.transformer-[a-z0-9_]{8}")  # older fluxnb's temporary folder: no PID, no marker


def is_complete(folder: Path) -> bool:
    """config.json and every weights file it needs: the single file, or each shard the index names."""
    index = folder / f"{_WEIGHTS}.index.json"
    try:
        files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {_WEIGHTS}
    except (ValueError, KeyError):
        return False
    return (folder / "config.json").is_file() and all((folder / f).is_file() for f in files)


def _legacy_temps(out: Path) -> list[Path]:
    """Temporary folders of older fluxnb that a killed merge left (a model's size each): named as it named them,
    holding nothing but merge output, last written before this process started."""
    found = [p for p in out.glob(".transformer-*") if _LEGACY_TEMP.fullmatch(p.name) and p.is_dir()
             and not p.is_symlink() and all(f.is_file() and _OUTPUT.fullmatch(f.name) for f in p.iterdir())]
    return [p for p in found if abandoned(p, None)]


def leftovers(out: Path) -> bool:
    """Whether a stopped merge left something in `out` for `repair` to do."""
    return out.is_dir() and (any(p.name.startswith(".transformer-") for p in out.iterdir())
                             or ((out / MERGE_INFO).is_file() and (out / "transformer" / MERGE_INFO).is_file()))


def repair(out: Path) -> None:
    """Make right what a stopped merge left in `out` (the caller holds the run's lock), in one line: finish a swap
    that a kill cut between its two renames, remove temporary folders nobody writes, and the merge.json that
    older fluxnb kept beside transformer/ once the one inside it describes the weights."""
    target = out / "transformer"
    legacy = _legacy_temps(out) if out.is_dir() else []
    line = recover_folder(target, lambda p: (p / MERGE_INFO).is_file() and is_complete(p), also=legacy)
    if line:
        print(line)
    beside = out / MERGE_INFO
    if beside.is_file() and (target / MERGE_INFO).is_file() and "lora_sha256" in beside.read_text():
        beside.unlink()
