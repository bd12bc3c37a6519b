"""The run directory: one folder that every notebook reads and writes, so each can be re-run alone.

    runs/mucha/
      config.json                      the RunConfig (fluxnb.config)
      samples.jsonl                    one line per training sample: id, caption, source, bucket, flip
      embeddings/<caption_id>.safetensors   T5 prompt_embeds (L, 4096), CLIP pooled (768,), text_ids (L, 3)
      embeddings/meta.json             what the embeddings were made with (model, max_sequence_length, dtype)
      latents/<sample_id>.safetensors  VAE latent distribution: mean and std (C, h, w), before shift/scale
      latents/meta.json                what the latents were made with (model, resolution, buckets)
      (the validation prompts' embeddings are in embeddings/ too, keyed by caption_id(prompt))
      checkpoints/step-N/              resumable training state
      lora/pytorch_lora_weights.safetensors
      samples/  metrics.jsonl

Samples are keyed by a hash of the image bytes and the caption, never by position in a loader: a latent and
its caption's embedding are found by the same id, so no shuffle can pair an image with another's caption.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from ._io import atomic_write_bytes, atomic_write_text
from .errors import FluxnbError

CACHE_VERSION = 1


class CacheMismatch(FluxnbError, RuntimeError):
    """A cache in the run directory was made with other settings than the ones asked for now."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    config = property(lambda self: self.root / "config.json")
    samples = property(lambda self: self.root / "samples.jsonl")
    embeddings = property(lambda self: self.root / "embeddings")
    latents = property(lambda self: self.root / "latents")
    validation = property(lambda self: self.root / "validation")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lora = property(lambda self: self.root / "lora")
    images = property(lambda self: self.root / "samples")
    metrics = property(lambda self: self.root / "metrics.jsonl")


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


def write_samples(run: RunDir, samples: list[Sample]) -> None:
    atomic_write_text(run.samples, "".join(json.dumps(asdict(s), sort_keys=True) + "\n" for s in samples))


def read_samples(run: RunDir) -> list[Sample]:
    if not run.samples.is_file():
        raise FluxnbError(f"{run.samples} is missing: run notebook 01 (text embeddings) for this run first.")
    return [Sample(**json.loads(line)) for line in run.samples.read_text().splitlines() if line.strip()]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written atomically (tensors moved to the CPU and made contiguous first)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    # Read the bytes ourselves: a memory-mapped file would stay open and block deletes on Windows and Drive.
    return load(Path(path).read_bytes())


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(folder / "meta.json", json.dumps({"cache_version": CACHE_VERSION, **meta}, indent=2, sort_keys=True))


def check_meta(folder: Path, expected: dict[str, Any]) -> bool:
    """True when `folder` holds a cache made with `expected` settings, False when there is none yet.

    Raises CacheMismatch (saying which settings differ) when a cache exists but was made otherwise, so that a
    cache for another model or resolution is never silently used.
    """
    path = folder / "meta.json"
    if not path.is_file():
        return False
    found = json.loads(path.read_text())
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


def file_metadata(path: Path) -> dict[str, str] | None:
    """The string metadata of a safetensors file (header only), or None if it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # missing, truncated, not safetensors: all mean "compute it again"
        return None


def is_cached(path: Path, settings_hash: str, key: str) -> bool:
    """True when `path` holds the tensors for `key` made with the settings whose fingerprint is `settings_hash`."""
    meta = file_metadata(path)
    return meta is not None and meta.get("settings") == settings_hash and meta.get("id") == key


def prune(folder: Path, settings_hash: str) -> int:
    """Delete cached files made with other settings (only when the user asked to overwrite). Returns how many."""
    stale = [p for p in folder.glob("*.safetensors") if (file_metadata(p) or {}).get("settings") != settings_hash]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def embedding_path(run: RunDir, caption: str) -> Path:
    return run.embeddings / f"{caption_id(caption)}.safetensors"


class CachedDataset(torch.utils.data.Dataset):
    """The training set as cached by notebooks 01 and 02: one item per row of samples.jsonl.

    Each item joins a sample's latent with the embedding of its OWN caption through the ids in samples.jsonl,
    so the order in which a loader visits items cannot mix them up. Latents are the VAE's distribution
    (mean, std), unscaled; training draws a fresh sample from it every time (fluxnb.flow).
    """

    def __init__(self, run: RunDir | str | Path) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.samples = read_samples(self.run)
        if not self.samples:
            raise FluxnbError(f"{self.run.samples} lists no samples: re-run notebook 01 on a non-empty dataset.")
        missing = [s.source for s in self.samples if not (self.run.latents / f"{s.id}.safetensors").is_file()]
        if missing:
            raise FluxnbError(
                f"{len(missing)} of {len(self.samples)} samples have no cached latents (first: {missing[0]}): "
                "run notebook 02 (or `python -m fluxnb latents`) for this run."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        latent = load_tensors(self.run.latents / f"{sample.id}.safetensors")
        text = load_tensors(self.run.embeddings / f"{sample.caption_id}.safetensors")
        return {"id": sample.id, "caption": sample.caption, "latent_mean": latent["mean"], "latent_std": latent["std"],
                "prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"],
                "text_ids": text["text_ids"]}
