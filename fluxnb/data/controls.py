"""FLUX.1-Kontext-dev's pairs (model.kontext): each training image, the target, has a control image, the input its
caption's instruction edits ("make it tnyst style"). Kontext learns control + instruction -> target.

    check_controls(prepared)      # before the VAE loads (fluxnb.data.latents.problems): every pair has a readable control
    control_image(item)           # the control as the VAE sees it: its target's bucket, crop and flip
    control_tag(record)           # the hash of the control's bytes, kept in the cached latent's metadata
    validation_controls(run)      # one control per validation prompt, for the sample grids (fluxnb.train)

Where the controls are is fluxnb.data.sources' business (control/<same path> beside local images, or a Hub column).
Unlike a mask, a control cannot be left out: a pair without its input teaches no edit, so a missing or unreadable
control stops notebook 02 with one line naming the pairs, before the VAE loads.

A control goes through its target's very transform: EXIF upright and RGB (fluxnb.data.checks.open_image), then
fluxnb.data.buckets.fit_to_bucket at the target's bucket with the same crop spot and flip, so a pair of one size
lines up pixel for pixel. A control of another size, or shape, is allowed: it is resized to cover the target's
bucket and cropped at the same spot, so its latent has the target's shape and a batch of one bucket stacks.
(diffusers' train_dreambooth_lora_flux_kontext.py resizes both images of a pair to one fixed size.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path

from PIL import Image

from ..base.errors import FluxnbError
from ..config import KONTEXT
from ..run import Run
from .buckets import fit_to_bucket
from .checks import CheckedDataset, Item, open_image
from .pairs import no_controls, read_control, unreadable, where_controls
from .sources import Record, load_records


def control_tag(record: Record) -> str:
    """What identifies a record's control in its cached latent's metadata: the hash of its bytes, or "none"."""
    return "none" if record.control is None else hashlib.sha256(record.control()).hexdigest()[:16]


def check_controls(prepared: CheckedDataset) -> None:
    """Raises FluxnbError, in one line naming them, when pairs have no control or one that cannot be decoded."""
    if not prepared.kontext:
        raise FluxnbError(f"this dataset was checked without its control images, but the run trains {KONTEXT}: "
                          "check it with data.check_dataset(run.config.data, kontext=run.config.model.kontext).")
    bad: list[str] = []
    for item in prepared.items:
        if item.sample.flip:  # a flip shares its record with its unflipped sample
            continue
        if (data := read_control(item.record, bad)) is None:
            continue
        try:
            open_image(data)  # decoded whole, as check_dataset decodes the targets
        except Exception as err:  # unreadable, truncated, not an image
            bad.append(unreadable(item.record, err))
    if bad:
        raise FluxnbError(no_controls(bad, prepared.config.control_column))


def control_image(item: Item) -> Image.Image:
    """The item's control, RGB at its bucket (width, height): upright, resized to cover, cropped and flipped as
    its target (fluxnb.data.checks.Item.image)."""
    if item.record.control is None:
        raise FluxnbError(f"{item.record.source} has no control image: {KONTEXT} trains on pairs.")
    s = item.sample
    rgb, _, _ = open_image(item.record.control())
    return fit_to_bucket(rgb, (s.width, s.height), item.crop, s.id.removesuffix("-flip"), s.flip)


def _read(name: str, read: Callable[[], bytes]) -> Image.Image:
    try:
        return open_image(read())[0]
    except Exception as err:  # a file gone or broken since the config was checked
        raise FluxnbError(f"the validation control image {name} cannot be read ({type(err).__name__}: {err}): "
                          "replace it, or list others in data.validation_images.") from None


def validation_controls(run: Run) -> list[Image.Image]:
    """One RGB control per validation prompt, fitted to (data.width, data.height) with a center crop: the files of
    data.validation_images, or (none given) the controls of the first training pairs, cycled over the prompts."""
    cfg, model = run.config.data, run.config.model
    if not model.kontext:
        raise FluxnbError(f"validation controls are {KONTEXT}'s input images; this run trains {model.base}.")
    n = len(cfg.validation_prompts)
    if cfg.validation_images:
        found = [(path, Path(path).expanduser().read_bytes) for path in cfg.validation_images]
    else:
        records = load_records(cfg, kontext=True).records
        found = [(f"{r.source}'s control", r.control) for r in records if r.control is not None][:n]
        if not found:
            raise FluxnbError(f"no training pair of {cfg.dataset} has a control image to sample from: "
                              f"{where_controls(cfg.control_column)}; or list control images in data.validation_images.")
    images = [_read(name, read) for name, read in found]
    return [fit_to_bucket(img, (cfg.width, cfg.height)) for img in islice(cycle(images), n)]
