"""The training set's index and the caches' bookkeeping: samples.jsonl, content ids, meta.json, fingerprints.

    samples.jsonl                 one line per training sample: id, caption, caption_id, source, bucket, flip
    embeddings/meta.json          what a cache folder was made with (model, sizes, ...); see check_meta
    <cache>/<id>.safetensors      each cached file carries its id and its settings' fingerprint in its metadata

Samples are keyed by a hash of the image bytes and the caption, never by position in a loader: a latent and
its caption's embedding are found by the same id, so no shuffle can pair an image with another's caption.
The file formats themselves belong to fluxnb.data.embeddings and fluxnb.data.latents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..base.errors import FluxnbError
from ..base.files import atomic_write_text, tensors_metadata
from ..base.temps import remove_abandoned_files
from ..run import RunDir

CACHE_VERSION = 1
META_FILE = "meta.json"


class CacheMismatch(FluxnbError, RuntimeError):
    """A cache in the run directory was made with other settings than the ones asked for now."""


def caption_id(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def sample_id(image_bytes: bytes, caption: str, *, flip: bool = False) -> str:
    """Stable id of one training sample: the same image file and caption give the same id on every machine."""
    digest = hashlib.sha256(image_bytes)
    digest.update(b"\0" + caption.encode("utf-8"))
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
    encoded: int
    seconds: float

    @property
    def reused(self) -> int:
        return self.total - self.encoded

    def __str__(self) -> str:
        return (f"{self.what}: {self.total} {self.unit} ({self.encoded} encoded, {self.reused} reused from the cache) "
                f"in {self.seconds:.1f} s")


def remove_abandoned(run: RunDir, folder: Path) -> None:
    """The temporary files that a killed caching step left in its cache `folder` and beside samples.jsonl (each
    file is written through a temporary: fluxnb.base.temps), removed before this step writes there again."""
    remove_abandoned_files(folder)
    remove_abandoned_files(run.root, [run.samples_file.name])


def write_samples(run: RunDir, samples: list[Sample]) -> None:
    atomic_write_text(run.samples_file, "".join(json.dumps(asdict(s), sort_keys=True) + "\n" for s in samples))


def read_samples(run: RunDir) -> list[Sample]:
    if not run.samples_file.is_file():
        raise FluxnbError(f"{run.samples_file} is missing: run notebook 01 (text embeddings) for this run first.")
    return [Sample(**json.loads(line)) for line in run.samples_file.read_text().splitlines() if line.strip()]


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(folder / META_FILE, json.dumps({"cache_version": CACHE_VERSION, **meta}, indent=2, sort_keys=True))


def read_meta(folder: Path) -> dict[str, Any]:
    """What a cache folder was made with ({} when there is no cache yet)."""
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_meta(folder: Path, expected: dict[str, Any]) -> bool:
    """True when `folder` holds a cache made with `expected` settings, False when there is none yet.

    Raises CacheMismatch (saying which settings differ) when a cache exists but was made otherwise, so that a
    cache for another model or resolution is never silently used.
    """
    found = read_meta(folder)
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
    """True when `path` holds the tensors for `key` made with the settings whose fingerprint is `settings_hash`."""
    meta = tensors_metadata(path)
    return meta is not None and meta.get("settings") == settings_hash and meta.get("id") == key


def prune(folder: Path, settings_hash: str) -> int:
    """Delete cached files made with other settings (only when the user asked to overwrite). Returns how many."""
    stale = [p for p in folder.glob("*.safetensors") if (tensors_metadata(p) or {}).get("settings") != settings_hash]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
