"""The training set's index and the caches' bookkeeping: samples.jsonl, content ids, meta.json, fingerprints.

    samples.jsonl                 one line per training sample: id, caption, caption_id, source, bucket, flip
    embeddings/meta.json          what a cache folder was made with (model, sizes, ...); see check_meta
    <cache>/<id>.safetensors      each cached file carries its id and its settings' fingerprint in its metadata

Samples are keyed by a hash of the image bytes and the caption, never by position in a loader: a latent and
its caption's embedding are found by the same id, so no shuffle can pair an image with another's caption.
The file formats themselves belong to fluxnb.data.embeddings and fluxnb.data.latents.

These are fluxnb's own files, so a broken one (a disk or a sync tool that cut it, NaN written by a failing GPU) is
never the user's to mend: the step that writes it (notebook 01 / 02) checks each file it would reuse and rebuilds
what is broken, and every other reader stops with one line naming the file and that step (BrokenCacheFile).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import FluxnbError
from ..base.files import atomic_write_text, load_tensors, tensors_metadata
from ..base.temps import remove_abandoned_files
from ..run import RunDir

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 1
META_FILE = "meta.json"


MISSING, OTHER_SETTINGS = "missing", "made with other settings"  # why a file is encoded, when it is not broken
STEPS = {"embeddings": ("01", "embed"), "latents": ("02", "latents")}  # the notebook and command writing each cache


class CacheMismatch(FluxnbError, RuntimeError):
    """A cache in the run directory was made with other settings than the ones asked for now."""


class BrokenCacheFile(FluxnbError):
    """A file fluxnb cached (samples.jsonl, a meta.json, a latent, an embedding) cannot be read or holds NaN/inf:
    the step that writes it rebuilds it."""


def rerun(root: Path, *caches: str) -> str:
    """How to rebuild a cache: "notebook 02 (`python -m fluxnb latents --run-dir R`)"; several: either of them."""
    return " or ".join(f"notebook {STEPS[c][0]} (`python -m fluxnb {STEPS[c][1]} --run-dir {root}`)" for c in caches)


def caption_id(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def sample_id(image_bytes: bytes, caption: str, *, flip: bool = False, control: bytes | None = None) -> str:
    """Stable id of one training sample: the same image file and caption give the same id on every machine.
    `control`: a FLUX.1-Kontext-dev pair's input image, part of what it trains on, so part of its id (two pairs
    differing only in their control are two samples; an edited control is new data). None: the id is unchanged."""
    digest = hashlib.sha256(image_bytes)
    digest.update(b"\0" + caption.encode("utf-8"))
    if control is not None:
        digest.update(b"\0control\0" + hashlib.sha256(control).digest())  # fixed-size: no two splits hash alike
    return digest.hexdigest()[:16] + ("-flip" if flip else "")


@dataclass(frozen=True)
class Sample:
    """One row of samples.jsonl: what links a cached latent to the embedding of its own caption."""

    id: str  # latents/<id>.safetensors
    caption: str  # the full caption as encoded (instance prompt included)
    caption_id: str  # embeddings/<caption_id>.safetensors
    source: str  # file name or dataset row, for messages
    width: int  # bucket size in pixels
    height: int
    flip: bool = False


@dataclass
class CacheStats:
    """What one caching pass did: `what` ("embeddings: 20 texts" / "latents: 16 samples"), encoded vs reused."""

    what: str  # "embeddings" or "latents"
    unit: str  # "texts" or "samples"
    total: int
    encoded: int  # includes the broken files encoded again
    seconds: float
    broken: dict[str, int] = field(default_factory=dict)  # why -> how many cached files were broken (encoded again)
    rebuilt: list[str] = field(default_factory=list)  # fluxnb's own index files found broken and written anew

    @property
    def reused(self) -> int:
        return self.total - self.encoded

    def __str__(self) -> str:
        n = sum(self.broken.values())
        why = ", ".join(k if len(self.broken) == 1 else f"{v} {k}" for k, v in sorted(self.broken.items()))
        again = f"{n} re-encoded ({why}), " if n else ""
        rebuilt = f"; rebuilt {', '.join(self.rebuilt)}" if self.rebuilt else ""
        return (f"{self.what}: {self.total} {self.unit} ({self.encoded - n} encoded, {again}{self.reused} reused from "
                f"the cache{rebuilt}) in {self.seconds:.1f} s")


_FIELDS = {"id": str, "caption": str, "caption_id": str, "source": str, "width": int, "height": int, "flip": bool}


def remove_abandoned(run: RunDir, folder: Path) -> None:
    """The temporary files that a killed caching step left in its cache `folder` and beside samples.jsonl (each
    file is written through a temporary: fluxnb.base.temps), removed before this step writes there again."""
    remove_abandoned_files(folder)
    remove_abandoned_files(run.root, [run.samples_file.name])


def write_samples(run: RunDir, samples: list[Sample]) -> None:
    atomic_write_text(run.samples_file, "".join(json.dumps(asdict(s), sort_keys=True) + "\n" for s in samples))


def _parse_samples(path: Path) -> list[Sample]:
    """samples.jsonl's rows; ValueError("line 3: not JSON") when a line is not a row fluxnb wrote."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError("not text") from None
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"line {n}: not JSON") from None
        if not (isinstance(row, dict) and set(_FIELDS) - {"flip"} <= set(row) <= set(_FIELDS)
                and all(type(v) is _FIELDS[k] for k, v in row.items())):
            raise ValueError(f"line {n}: wrong fields")
        samples.append(Sample(**row))
    return samples


def read_samples(run: RunDir) -> list[Sample]:
    if not run.samples_file.is_file():
        raise FluxnbError(f"{run.samples_file} is missing: run notebook 01 (text embeddings) for this run first.")
    try:
        return _parse_samples(run.samples_file)
    except ValueError as err:
        raise BrokenCacheFile(f"{run.samples_file} is broken ({err}): it is fluxnb's own list of the training set; "
                              f"run {rerun(run.root, 'embeddings', 'latents')} again: either rewrites it.") from None


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(folder / META_FILE, json.dumps({"cache_version": CACHE_VERSION, **meta}, indent=2, sort_keys=True))


def _parse_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        raise ValueError("not JSON") from None
    if not (isinstance(meta, dict) and type(meta.get("cache_version")) is int):
        raise ValueError("wrong fields")
    return meta


def read_meta(folder: Path, *, rebuild: bool = False) -> dict[str, Any]:
    """What a cache folder was made with ({} when there is no cache yet). A broken meta.json is BrokenCacheFile,
    naming the step that rebuilds it; that step reads it with rebuild=True: {} (each file's own fingerprint still
    decides what is reused)."""
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        return _parse_meta(path)
    except ValueError as err:
        if rebuild:
            return {}
        raise BrokenCacheFile(f"{path} is broken ({err}): it records what the cache beside it was made with; run "
                              f"{rerun(folder.parent, folder.name)} again, which rebuilds it.") from None


def own_file_problems(run: RunDir, folder: Path) -> list[str]:
    """samples.jsonl and folder/meta.json, when broken: ["samples.jsonl (line 3: not JSON)", ...], for the
    summary of the step that is about to write them anew."""
    found = []
    for path, parse in ((run.samples_file, _parse_samples), (folder / META_FILE, _parse_meta)):
        try:
            if path.is_file():
                parse(path)
        except ValueError as err:
            found.append(f"{path.name} ({err})")
    return found


def check_meta(folder: Path, expected: dict[str, Any], *, rebuild: bool = False) -> bool:
    """True when `folder` holds a cache made with `expected` settings, False when there is none yet (or, with
    rebuild=True, a broken meta.json: see read_meta).

    Raises CacheMismatch (saying which settings differ) when a cache exists but was made otherwise, so that a
    cache for another model or resolution is never silently used.
    """
    found = read_meta(folder, rebuild=rebuild)
    if not found:
        return False
    wanted = {"cache_version": CACHE_VERSION, **json.loads(json.dumps(expected))}
    diffs = [f"{k}: cached {found.get(k)!r}, now {v!r}" for k, v in wanted.items() if found.get(k) != v]
    if diffs:
        raise CacheMismatch(
            f"{folder} was made with other settings ({'; '.join(diffs)}). Pass overwrite=True (or --overwrite) "
            "to rebuild it, or use another run directory to keep both."
        )
    return True


def fingerprint(settings: dict[str, Any]) -> str:
    """Short hash of cache settings, stored in every cached file so a file made otherwise is never reused."""
    text = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_cached(path: Path, settings_hash: str, key: str) -> bool:
    """True when `path` holds the tensors for `key` made with the settings whose fingerprint is `settings_hash`
    (its header alone: training reads the tensors anyway, and checks them then, see load_checked)."""
    meta = tensors_metadata(path)
    return meta is not None and meta.get("settings") == settings_hash and meta.get("id") == key


Check = Callable[[dict[str, "torch.Tensor"]], "str | None"]  # a cache format's own check: why it is broken, or None


def non_finite(*tensors: torch.Tensor) -> str | None:
    """ "NaN in cache" / "inf in cache" when a tensor holds one, else None."""
    for t in tensors:
        if not bool(t.isfinite().all()):
            return "NaN in cache" if bool(t.isnan().any()) else "inf in cache"
    return None


def _load(path: Path, check: Check) -> tuple[dict[str, torch.Tensor], str | None]:
    try:
        tensors = load_tensors(path)
    except Exception:  # truncated, not safetensors, unreadable: all mean "encode it again"
        return {}, "unreadable"
    return tensors, check(tensors)


def cache_problem(path: Path, settings_hash: str, key: str, check: Check | None) -> str | None:
    """None when the cached file at `path` can be reused; else why not: MISSING or OTHER_SETTINGS (encode it, as
    always), or what is broken in it ("unreadable", "NaN in cache", "wrong shape", ...: encode it again, and say
    so). Reads the whole file once (a latent is a few hundred KB, an embedding a few MB); check=None: its
    header only."""
    if not path.is_file():
        return MISSING
    meta = tensors_metadata(path)
    if meta is None:
        return "unreadable"
    if meta.get("settings") != settings_hash:
        return OTHER_SETTINGS
    if meta.get("id") != key:
        return "another sample's file"
    return None if check is None else _load(path, check)[1]


def load_checked(path: Path, check: Check, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of one cached file, checked (`check`): a broken one is BrokenCacheFile naming it and `fix`, so
    that training stops on it at once, before any loss, instead of diverging and blaming the learning rate."""
    tensors, why = _load(path, check)
    if why:
        raise BrokenCacheFile(f"{path} is broken ({why}): run {fix} again; it checks every cached file and encodes "
                              "the broken ones anew. Nothing is trained on a broken cache.")
    return tensors


def name_broken(folder: Path, found: dict[Path, str | None]) -> dict[str, int]:
    """Among `found` (path -> cache_problem), the broken files, named in one line and counted by reason: they are
    encoded again, never reused."""
    broken = {p: why for p, why in found.items() if why not in (None, MISSING, OTHER_SETTINGS)}
    if broken:
        names = ", ".join(f"{p.name} ({why})" for p, why in list(broken.items())[:3])
        print(f"fluxnb: {len(broken)} cached file(s) in {folder} are broken and are encoded again: {names}"
              f"{', ...' if len(broken) > 3 else ''}")
    return dict(Counter(broken.values()))


def prune(folder: Path, settings_hash: str) -> int:
    """Delete cached files made with other settings (only when the user asked to overwrite). Returns how many."""
    stale = [p for p in folder.glob("*.safetensors") if (tensors_metadata(p) or {}).get("settings") != settings_hash]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
