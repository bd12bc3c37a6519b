"""Where the training images and captions come from: a Hub dataset or a local folder, as a list of Records.

    load_records(cfg.data) -> Loaded(records=[Record(source="03_cat.png", caption="a cat", read=<bytes>), ...])

- Hub id (`derekl35/alphonse-mucha-style`): `datasets.load_dataset(id, split="train")`, columns
  `cfg.image_column` / `cfg.caption_column`. The image column must hold images (the `datasets` Image feature):
  a column of text naming files on this machine is refused, and so is an image given only as the path of a
  local file that `datasets` did not download.
- Local folder, imagefolder layout: images + `metadata.jsonl` (or `metadata.csv`) with a `file_name` column and
  the caption column, as `datasets` expects it.
- Local folder of pairs: `cat.png` + `cat.txt` (the caption), in any sub-folder.
- Masks (data.masked_loss): a local folder's `masks/` sub-folder holds one grey image per training image, at the
  same path and name (any image extension): `cats/03.jpg` -> `masks/cats/03.png`; a Hub dataset's masks are its
  `cfg.mask_column` image column. An image without one trains unmasked (fluxnb.data.masks).
- Controls (FLUX.1-Kontext-dev, `kontext=True`: the caller reads it from model.kontext): each target image's pair
  input, at `control/<same path>` (any image extension) in a local folder, or in the `cfg.control_column` image
  column of a Hub dataset. A pair without its control is an error before the VAE loads (fluxnb.data.controls).

Only files inside a local dataset folder are ever read: a row whose file, followed through '..', an absolute path
or a link, lies outside it is a data error naming the row, and is never opened.

Nothing here decodes images or judges captions: Records keep the raw bytes reader and the raw caption value, so
that fluxnb.data.checks can check every row and report all problems at once. Images are read lazily (a big dataset
never sits in memory).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import FluxnbError, first_names
from ..base.hub_errors import LOGIN_HOWTO, explain, offline_unless_reachable
from ..config import DataConfig
from .pairs import PAIRED

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MASKS_FOLDER = "masks"  # a local dataset's masks (data.masked_loss), at the same paths as the images
CONTROL_FOLDER = "control"  # a local Kontext dataset's input images, at the same paths as their targets


@dataclass(frozen=True)
class Record:
    source: str  # how messages name this row: a file path inside the folder, or "row 12" of a Hub dataset
    caption: Any  # as found: normally a str; None when missing; anything else is reported as not text
    read: Callable[[], bytes]  # the image file's bytes (may raise OSError)
    mask: Callable[[], bytes] | None = None  # its mask's bytes (data.masked_loss), None when it has none
    control: Callable[[], bytes] | None = None  # Kontext: its pair's input image's bytes, None when it has none


@dataclass
class Loaded:
    description: str  # "local folder /x (metadata.jsonl)" / "Hub dataset user/name"
    records: list[Record]
    notes: list[str] = field(default_factory=list)  # things worth saying that are not problems
    errors: list[str] = field(default_factory=list)  # problems the user must fix (bad metadata lines...)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def metadata_rows(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(("metadata.jsonl line 3", row), ...) and one error per unreadable line."""
    rows, errors = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"{path.name} cannot be read ({_first_line(err)}): save it as UTF-8 text."]
    if path.suffix == ".csv":
        for n, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):  # keeps quoted newlines
            rows.append((f"{path.name} line {n}", row))
        return rows, errors
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"{path.name} line {n} is not valid JSON ({err.msg}): fix or delete that line.")
            continue
        if not isinstance(row, dict):
            errors.append(f"{path.name} line {n} is not a JSON object: write {{\"file_name\": ..., \"text\": ...}}.")
            continue
        rows.append((f"{path.name} line {n}", row))
    return rows, errors


def _missing(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        raise FileNotFoundError(f"{path} does not exist")
    return read


def _outside(folder: Path, path: Path) -> bool:
    """Whether `path` (followed through '..' and links) leads out of `folder`: fluxnb never reads such a file."""
    return not path.resolve().is_relative_to(folder.resolve())


def _refuse_outside(loaded: Loaded, folder: Path, rows: list[str]) -> None:
    if rows:
        loaded.errors.append(f"{len(rows)} row(s) name a file outside the dataset folder {folder} (through '..', an "
                             f"absolute path or a link): {first_names(rows)}. fluxnb reads only files inside "
                             "the dataset folder: copy those images into it, or remove the rows.")


def _load_imagefolder(folder: Path, meta: Path, cfg: DataConfig, kontext: bool) -> Loaded:
    rows, errors = metadata_rows(meta)
    loaded = Loaded(f"local folder {folder} ({meta.name})", [], errors=errors)
    keys = {k for _, row in rows for k in row}
    if rows and cfg.caption_column not in keys and not cfg.instance_prompt:
        loaded.errors.append(f"{meta.name} has no '{cfg.caption_column}' column (it has: {', '.join(sorted(keys))}): "
                             "set caption_column to the column holding the captions, or give an instance_prompt.")
    listed, outside = set(), []
    for where, row in rows:
        name = row.get("file_name", row.get(cfg.image_column))
        if not isinstance(name, str) or not name:
            loaded.errors.append(f"{where} has no 'file_name': add the image's file name (relative to {folder}).")
            continue
        path = folder / name
        if _outside(folder, path):  # never opened: not even to say it is not an image
            outside.append(f"{where} ({name})")
            continue
        listed.add(path.resolve())
        read = _file_reader(path) if path.is_file() else _missing(path)
        loaded.records.append(Record(name, row.get(cfg.caption_column), read, find_mask(folder, name, cfg),
                                     find_control(folder, name, kontext)))
    _refuse_outside(loaded, folder, outside)
    unlisted = [p for p in images_in(folder, cfg, kontext=kontext) if p.resolve() not in listed]
    if unlisted:
        loaded.notes.append(f"{len(unlisted)} image(s) in the folder are not in {meta.name} and are left out "
                            f"(first: {unlisted[0].relative_to(folder)}).")
    return loaded


def images_in(folder: Path, cfg: DataConfig | None = None, *, kontext: bool = False) -> list[Path]:
    """The training images: masks/ holds masks (data.masked_loss) and control/ the inputs (kontext), not targets."""
    aside = {MASKS_FOLDER} if cfg is not None and cfg.masked_loss else set()
    aside |= {CONTROL_FOLDER} if kontext else set()
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.relative_to(folder).parts[0] not in aside)


def _beside(folder: Path, sub: str, name: str) -> Callable[[], bytes] | None:
    """The reader of <sub>/<name> (any image extension), or None: no such file, or one outside the folder."""
    same = folder / sub / name
    found = [p for e in IMAGE_EXTENSIONS if (p := same.with_name(same.stem + e)).is_file()]  # "a.b.jpg" -> "a.b.png"
    return _file_reader(found[0]) if found and not _outside(folder, found[0]) else None


def find_mask(folder: Path, name: str, cfg: DataConfig) -> Callable[[], bytes] | None:
    """The reader of masks/<name> (any image extension), or None: masks off, no such file, or one outside."""
    return _beside(folder, MASKS_FOLDER, name) if cfg.masked_loss else None


def find_control(folder: Path, name: str, kontext: bool) -> Callable[[], bytes] | None:
    """The reader of control/<name> (any image extension), or None: not Kontext, no such file, or one outside."""
    return _beside(folder, CONTROL_FOLDER, name) if kontext else None


def _read_caption(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return path.read_bytes()  # reported as "not text": the file is not UTF-8


def _load_pairs(folder: Path, cfg: DataConfig, kontext: bool) -> Loaded:
    loaded, outside = Loaded(f"local folder {folder} (images + .txt captions)", []), []
    for image in images_in(folder, cfg, kontext=kontext):
        name, txt = image.relative_to(folder).as_posix(), image.with_suffix(".txt")
        if _outside(folder, image) or _outside(folder, txt):  # a link leading out of the folder
            outside.append(name)
            continue
        loaded.records.append(Record(name, _read_caption(txt), _file_reader(image), find_mask(folder, name, cfg),
                                     find_control(folder, name, kontext)))
    _refuse_outside(loaded, folder, outside)
    return loaded


def load_local(folder: Path, cfg: DataConfig, *, kontext: bool = False) -> Loaded:
    if not folder.is_dir():
        raise FluxnbError(f"dataset {str(folder)!r} is a file, not a folder: give the folder that holds the images "
                          "(with metadata.jsonl, or a .txt caption next to each image).")
    meta = next((folder / m for m in METADATA_FILES if (folder / m).is_file()), None)
    return _load_imagefolder(folder, meta, cfg, kontext) if meta else _load_pairs(folder, cfg, kontext)


class NotInDataset(OSError):
    """A Hub dataset row whose image is a path to a local file that `datasets` did not download: never read."""


def _downloaded(path: str) -> bool:
    """Whether a path-only image (a Hub dataset of image files) lies in the caches `datasets` downloads into."""
    import datasets
    from huggingface_hub import constants

    roots = (datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE)
    return any(not _outside(Path(root).expanduser(), Path(path)) for root in roots)


def _hub_reader(ds: Any, index: int, column: str) -> Callable[[], bytes]:
    def read() -> bytes:
        value = ds[index][column]  # {"bytes", "path"}: the column is an Image feature (load_hub)
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        path = value.get("path") if isinstance(value, dict) else None
        if isinstance(path, str) and path and _downloaded(path):
            return Path(path).read_bytes()
        if isinstance(path, str) and path:
            raise NotInDataset(f"its image is the path of a local file ({path}), not an image in the dataset: "
                               "refused; put the image itself into the dataset")
        raise OSError(f"column '{column}' holds {type(value).__name__}, not an image")
    return read


def _image_column(ds: Any, dataset_id: str, column: str, what: str, fix: str) -> Any:
    """`ds` with `column` read as raw bytes; FluxnbError when it is not an image column."""
    import datasets

    if not isinstance(ds.features.get(column), datasets.Image):
        raise FluxnbError(f"{dataset_id} has no image column '{column}' for {what} (columns: "
                          f"{', '.join(ds.column_names)}): {fix}.")
    return ds.cast_column(column, datasets.Image(decode=False))


def _hub_optional(ds: Any, index: int, column: str) -> Callable[[], bytes] | None:
    """A row's mask (or control) reader; None when that cell is empty (the row trains unmasked, or lacks its pair)."""
    value = ds[index][column]
    return _hub_reader(ds, index, column) if isinstance(value, dict) and (value.get("bytes") or value.get("path")) \
        else None


def load_hub(dataset_id: str, cfg: DataConfig, *, kontext: bool = False) -> Loaded:
    import datasets

    try:
        with offline_unless_reachable(dataset_id):  # no minute of retries when there is no network
            ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # network, auth, a typo: all end here, and all need the same advice
        why = explain(err, dataset_id, "dataset") or _first_line(err)
        raise FluxnbError(
            f"Could not load the Hub dataset {dataset_id!r} (and there is no local folder of that name): {why} "
            f"Check the name, your internet connection (and HF_HUB_OFFLINE); for a private or gated dataset "
            f"{LOGIN_HOWTO}. Or give a local folder: images + metadata.jsonl, or images with same-name .txt captions."
        ) from None
    columns = ds.column_names
    if cfg.image_column not in columns:
        raise FluxnbError(f"{dataset_id} has no image column '{cfg.image_column}' (columns: {', '.join(columns)}): "
                          "set image_column.")
    feature = ds.features[cfg.image_column]
    if not isinstance(feature, datasets.Image):  # e.g. strings: paths to files on this machine, never read
        raise FluxnbError(f"{dataset_id}'s column '{cfg.image_column}' holds {feature!r}, not images: fluxnb trains "
                          "only on images stored in a dataset (the `datasets` Image feature). Set image_column to "
                          "the column holding the images.")
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # raw bytes: we decode and check
    if cfg.caption_column in columns:
        captions = ds[cfg.caption_column]
    elif cfg.instance_prompt:
        captions = [None] * len(ds)
    else:
        raise FluxnbError(f"{dataset_id} has no caption column '{cfg.caption_column}' (columns: {', '.join(columns)}):"
                          " set caption_column, or give an instance_prompt to use for every image.")
    if cfg.masked_loss:
        ds = _image_column(ds, dataset_id, cfg.mask_column, "the masks", "set mask_column, or masked_loss=False")
    if kontext:
        ds = _image_column(ds, dataset_id, cfg.control_column, "the pairs' control (input) images",
                           f"set control_column to the column holding each pair's input image, or {PAIRED}")
    records = [Record(f"row {i}", captions[i], _hub_reader(ds, i, cfg.image_column),
                      _hub_optional(ds, i, cfg.mask_column) if cfg.masked_loss else None,
                      _hub_optional(ds, i, cfg.control_column) if kontext else None) for i in range(len(ds))]
    return Loaded(f"Hub dataset {dataset_id}", records)


def load_records(cfg: DataConfig, *, kontext: bool = False) -> Loaded:
    """Every row of the dataset named by `cfg.dataset`: a local folder if one exists there, else a Hub id.
    kontext (model.kontext): each record also gets its pair's control image (Record.control)."""
    local = Path(cfg.dataset).expanduser()
    if local.exists():
        return load_local(local, cfg, kontext=kontext)
    if cfg.dataset.startswith(("/", "./", "../", "~")) or "\\" in cfg.dataset or cfg.dataset.count("/") > 1:
        raise FluxnbError(f"dataset folder {cfg.dataset!r} does not exist: check the path (or give a Hub id "
                          "user/name).")
    return load_hub(cfg.dataset, cfg, kontext=kontext)
