"""Notebook 02's computation: encode every training image once with the VAE, cache it, free the VAE.

FLUX's transformer never sees pixels: it denoises the VAE's latents, 16 channels at 1/8 of the size (a 512x768
image becomes (16, 96, 64)). The reference training script encodes every image again at every step, or caches
latents in one shuffle order and trains in another (pairing images with the wrong captions). Here each image is
encoded once at its bucket size and saved as latents/<sample_id>.safetensors, the id hashing the image bytes and
the caption: CachedDataset finds a sample's latent and its caption's embedding through the same id.

What is stored is the VAE's latent *distribution*, mean and std (C, h, w) in float32, before FLUX's shift and
scale, not one sample of it: training draws a fresh sample every time it sees the image (a little free
augmentation, exactly what encoding on the fly would do), for twice the disk of a single sample (~0.8 MB per
512x768 image).

With data.masked_loss each file also holds the sample's loss mask at the latent's size, "mask" (1, h, w), and the
hash of the mask file in its metadata: an edited mask makes the sample pending again (fluxnb.data.masks).
With model.kontext it also holds "control" (C, h, w): the posterior mean of the pair's control image, fitted to the
target's bucket, crop and flip (fluxnb.data.controls), and the control's hash: an edited control re-encodes.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..base.errors import FluxnbError
from ..base.files import save_tensors, tensors_metadata
from ..base.hub_errors import friendly_load
from ..base.memory import free, measure, report
from ..config import ModelConfig, RunConfig
from ..run import Run, RunDir, writes
from ..run.hardware import Hardware
from . import controls, embeddings, masks
from .checks import CheckedDataset, Item, check_dataset, progress_bar
from .store import (
    MISSING,
    OTHER_SETTINGS,
    CacheMismatch,
    CacheStats,
    Sample,
    cache_problem,
    check_meta,
    fingerprint,
    is_cached,
    load_checked,
    name_broken,
    non_finite,
    own_file_problems,
    prune,
    read_meta,
    read_samples,
    remove_abandoned,
    rerun,
    write_meta,
    write_samples,
)


def settings(config: RunConfig) -> dict[str, Any]:
    """What makes a cached latent valid: the VAE, and how images are sized and cropped."""
    m, d = config.model, config.data
    masked = {"mask_floor": d.mask_floor} if d.masked_loss else {}  # absent when off: older caches stay valid
    kontext = {"kontext": True} if m.kontext else {}  # the files hold controls (and are pairs, not images)
    return {"model_id": m.model_id, "revision": m.revision, "width": d.width, "height": d.height,
            "buckets": d.buckets, "bucket_step": d.bucket_step, "crop": d.crop} | masked | kontext


def latent_path(run: RunDir, sample_id: str) -> Path:
    """latents/<sample_id>.safetensors: the VAE posterior's mean and std, (C, h, w) float32 each."""
    return run.latents / f"{sample_id}.safetensors"


def save_latent(run: RunDir, sample: Sample, mean: torch.Tensor, std: torch.Tensor, settings_hash: str,
                mask: tuple[torch.Tensor, str] | None = None, control: tuple[torch.Tensor, str] | None = None) -> None:
    """`mask`: (loss mask (1, h, w), fluxnb.data.masks.mask_tag) when the run trains with masked loss; `control`:
    (the control's latent mean (C, h, w), fluxnb.data.controls.control_tag) when it trains FLUX.1-Kontext-dev."""
    extra = {name: part for name, part in (("mask", mask), ("control", control)) if part}
    save_tensors(latent_path(run, sample.id), {"mean": mean, "std": std} | {k: v[0] for k, v in extra.items()},
                 metadata={"id": sample.id, "settings": settings_hash, "caption_id": sample.caption_id,
                           "source": sample.source, "bucket": f"{sample.width}x{sample.height}",
                           "flip": str(sample.flip)} | {k: v[1] for k, v in extra.items()})


def latent_problem(tensors: dict[str, torch.Tensor], sample: Sample | None = None) -> str | None:
    """Why cached tensors are not a latent to train on (None: they are): mean and std, float32, the same
    (C, h, w) shape (the sample's bucket / 8 when given), finite; so is a Kontext pair's control, and a loss mask
    is float32 (1, h, w) and finite."""
    mean, std = tensors.get("mean"), tensors.get("std")
    both = (mean, std) + ((tensors["control"],) if "control" in tensors else ())
    if any(t is None or t.dtype != torch.float32 for t in both):
        return "wrong tensors"
    if mean.ndim != 3 or any(t.shape != mean.shape for t in both) or (
            sample is not None and mean.shape[1:] != (sample.height // 8, sample.width // 8)):
        return "wrong shape"
    mask = tensors.get("mask")  # data.masked_loss: one weight per latent pixel, (1, h, w)
    if mask is not None and (mask.dtype != torch.float32 or mask.shape != (1, *mean.shape[1:])):
        return "wrong mask"
    return non_finite(*both, *(() if mask is None else (mask,)))


def load_latent(run: RunDir, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of one cached sample, each (C, h, w), checked (BrokenCacheFile when NaN or unreadable)."""
    sample = load_sample(run, sample_id)
    return sample["latent_mean"], sample["latent_std"]


def load_sample(run: RunDir, sample_id: str) -> dict[str, torch.Tensor]:
    """What training reads of a cached sample: latent_mean, latent_std, loss_mask (1, h, w) if it has one, and
    control_latents (C, h, w: a Kontext pair's control, the unscaled posterior mean) if it has one."""
    tensors = load_checked(latent_path(run, sample_id), latent_problem, rerun(run.root, "latents"))
    names = {"mean": "latent_mean", "std": "latent_std", "mask": "loss_mask", "control": "control_latents"}
    return {names[k]: t for k, t in tensors.items() if k in names}


def cached_size(run: RunDir) -> tuple[int, int] | None:
    """(width, height) the latents were cached at, from latents/meta.json; None before notebook 02."""
    meta = read_meta(run.latents)
    return (meta["width"], meta["height"]) if {"width", "height"} <= meta.keys() else None


def stale(run: Run, samples: list[Sample] | None = None) -> list[Sample]:
    """The samples of samples.jsonl (or `samples`, read from it already) whose latent is missing or was made with
    other settings than the config's, e.g. by a `latents --overwrite` stopped midway (meta.json already new, half
    the files still old)."""
    tag = fingerprint(settings(run.config))
    samples = read_samples(run.dir) if samples is None else samples
    return [s for s in samples if not is_cached(latent_path(run.dir, s.id), tag, s.id)]


def load_vae(model: ModelConfig, hw: Hardware) -> Any:
    """FLUX's AutoencoderKL alone (84 M parameters, ~170 MB in bf16), on the run's device and dtype."""
    from diffusers import AutoencoderKL

    vae = friendly_load(lambda: AutoencoderKL.from_pretrained(
        model.model_id, subfolder="vae", revision=model.revision, dtype=hw.dtype), model.model_id)
    return vae.to(hw.device).eval().requires_grad_(False)


def check_embeddings(run: Run, prepared: CheckedDataset) -> None:
    """Every sample's caption must have its embedding from notebook 01, made with today's settings."""
    try:
        check_meta(run.dir.embeddings, embeddings.settings(run.config))
    except CacheMismatch as err:
        raise FluxnbError(f"the text embeddings do not match this run's settings: {err} Re-run notebook 01 "
                          "(`python -m fluxnb embed`) first.") from None
    # by the files' headers: reading every embedding is notebook 01's check (and training's), not this step's
    found = embeddings.problems(run, embeddings.texts_to_encode(run.config, prepared), contents=False)
    if found:
        text, why = next(iter(found.items()))
        cause = {MISSING: "the dataset or instance prompt changed since notebook 01",
                 OTHER_SETTINGS: "notebook 01 did not finish"}.get(why, "a cached embedding is broken")
        raise FluxnbError(f"{len(found)} caption(s) have no usable cached text embedding (first: {text[:60]!r}, "
                          f"{why}): {cause}. Re-run notebook 01 (`python -m fluxnb embed`) first.")


def problems(run: Run, prepared: CheckedDataset, *, overwrite: bool = False) -> dict[Path, tuple[Item, str]]:
    """The samples without a usable cached latent, by file, and why (fluxnb.data.store.cache_problem: missing,
    other settings, or broken: NaN, unreadable, ...). Raises CacheMismatch if latents/ was made otherwise."""
    wanted = settings(run.config)
    if not overwrite:
        check_meta(run.dir.latents, wanted, rebuild=True)
    if masked := run.config.data.masked_loss:
        masks.check_masks(prepared)  # a bad mask stops here, before the VAE loads
    if run.config.model.kontext:
        controls.check_controls(prepared)  # so does a pair without its control
    tag, out = fingerprint(wanted), {}
    for item in prepared.items:
        path, s = latent_path(run.dir, item.sample.id), item.sample
        if why := cache_problem(path, tag, s.id, functools.partial(latent_problem, sample=s)):
            out[path] = (item, why)
        # A mask file changed since it was cached (or came, or went); a control needs no such check: its bytes
        # are in the sample id (fluxnb.data.store.sample_id), so an edited control is a new id, a file not cached.
        elif masked and (tensors_metadata(path) or {}).get("mask") != masks.mask_tag(item.record):
            out[path] = (item, OTHER_SETTINGS)
    return out


def pending(run: Run, prepared: CheckedDataset, *, overwrite: bool = False) -> list[Item]:
    """Samples without a usable cached latent (see `problems`)."""
    return [item for item, _ in problems(run, prepared, overwrite=overwrite).values()]


@torch.no_grad()
def encode_image(vae: Any, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image (W, H) -> latent distribution (mean, std), each (C, H/8, W/8) float32."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(image)  # (1, 3, H, W) in [-1, 1]
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean[0].float(), dist.std[0].float()


def encode_checked(vae: Any, image: Image.Image, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_image, upcasting the VAE to fp32 once if fp16 overflows (NaN/inf) on this image."""
    mean, std = encode_image(vae, image)
    if not (mean.isfinite().all() and std.isfinite().all()):
        if vae.dtype == torch.float32:
            raise FluxnbError(f"the VAE returned NaN/inf for {source}: check that image (is it blank or broken?).")
        print(f"note: the VAE overflowed in {vae.dtype} on {source}; continuing in float32 (slower, exact).")
        vae.to(torch.float32)
        return encode_checked(vae, image, source)
    return mean, std


def encode_sample(run: Run, vae: Any, item: Item, settings_hash: str) -> None:
    """Encode one sample's image, and its mask and control when the run has them, into its latent file."""
    s, d = item.sample, run.config.data
    mean, std = encode_checked(vae, item.image(), s.source)
    mask = (masks.latent_mask(item, d.mask_floor), masks.mask_tag(item.record)) if d.masked_loss else None
    control = None
    if run.config.model.kontext:  # the mean, as FluxKontextPipeline encodes its input image (sample_mode="argmax")
        control_mean, _ = encode_checked(vae, controls.control_image(item), f"{s.source}'s control image")
        control = (control_mean, controls.control_tag(item.record))
    save_latent(run.dir, s, mean, std, settings_hash, mask, control)


@writes("latents")
def cache_latents(run: Run, vae: Any, prepared: CheckedDataset, *, overwrite: bool = False,
                  progress: bool = True) -> CacheStats:
    """Encode what is not cached yet (one file per sample id), then write samples.jsonl (the training set)."""
    start = time.perf_counter()
    check_embeddings(run, prepared)
    rebuilt = own_file_problems(run.dir, run.dir.latents)  # samples.jsonl, meta.json: written anew below
    found = problems(run, prepared, overwrite=overwrite)
    todo = [item for item, _ in found.values()]
    if todo and vae is None:
        raise FluxnbError(f"{len(todo)} image(s) need encoding but no VAE was given: load it with load_vae first.")
    broken = name_broken(run.dir.latents, {path: why for path, (_, why) in found.items()})
    wanted = settings(run.config)
    tag = fingerprint(wanted)
    remove_abandoned(run.dir, run.dir.latents)
    if run.config.data.masked_loss and (missing := masks.unmasked(prepared)):
        print(masks.missing_note(missing))
    if todo or overwrite or not check_meta(run.dir.latents, wanted, rebuild=True):
        write_meta(run.dir.latents, wanted | ({"dtype": str(vae.dtype).removeprefix("torch.")} if vae else {}))
    for item in progress_bar(todo, show=progress and bool(todo), desc="encoding images", unit="image"):
        encode_sample(run, vae, item, tag)
    if overwrite:
        prune(run.dir.latents, tag)
    write_samples(run.dir, prepared.samples)  # last: every row it lists now has a latent and an embedding
    n = len(prepared.items)
    return CacheStats("latents", "samples", n, len(todo), time.perf_counter() - start, broken, rebuilt)


@torch.no_grad()
def decode(vae: Any, run: Run, sample_ids: list[str]) -> list[Image.Image]:
    """Cached latent means decoded back to images: what the transformer learns from (VAE round trip)."""
    from diffusers.image_processor import VaeImageProcessor

    out = []
    for sid in sample_ids:
        mean = load_latent(run.dir, sid)[0][None].to(vae.device, vae.dtype)  # (1, C, h, w)
        pixels = vae.decode(mean).sample  # unscaled latents in, so no shift/scale here
        out += VaeImageProcessor(vae_scale_factor=8).postprocess(pixels.float(), output_type="pil")
    return out


def latents_step(run: Run, *, overwrite: bool = False, progress: bool = True) -> CacheStats:
    """The whole of notebook 02 headless (`python -m fluxnb latents`): check, encode what is missing, free."""
    prepared = check_dataset(run.config.data, progress=progress, kontext=run.config.model.kontext)
    print(prepared.report)
    check_embeddings(run, prepared)
    if not pending(run, prepared, overwrite=overwrite):
        return cache_latents(run, None, prepared, overwrite=overwrite, progress=progress)
    with measure("VAE: load + encode") as m:
        vae = load_vae(run.config.model, run.hw)
        stats = cache_latents(run, vae, prepared, overwrite=overwrite, progress=progress)
    print(m)
    free(vae)
    print(report("after freeing the VAE"))
    return stats

