"""Masked loss (data.masked_loss): one grey mask per image says where the loss counts. White = learn, black =
ignore, grey = in between (128 weighs about a half), as in kohya-ss/sd-scripts' masked loss and ai-toolkit.

    check_masks(prepared)             # before the VAE loads (fluxnb.data.latents.pending): every mask readable and its image's size
    latent_mask(item, floor)          # (1, h, w) in [floor, 1]: the bucket's crop and flip, averaged per latent pixel

Where the masks are is fluxnb.data.sources' business (masks/<same path> beside local images, or a Hub column).
An image without a mask trains unmasked (all ones) and is named in a note: masking a few images of a set is a
normal thing to do, and an error would make the user draw white masks for the rest. The mask is cached with the
image's latent (fluxnb.data.latents), which records the hash of the mask's bytes, so an edited mask re-encodes.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps

from ..base.errors import FluxnbError, first_names
from .buckets import fit_to_bucket
from .checks import CheckedDataset, Item
from .sources import Record

LATENT_FACTOR = 8  # the VAE's downsampling: one latent pixel covers 8x8 image pixels


def mask_tag(record: Record) -> str:
    """What identifies a record's mask in its cached latent's metadata: the hash of its bytes, or "none"."""
    return "none" if record.mask is None else hashlib.sha256(record.mask()).hexdigest()[:16]


def _upright(data: bytes) -> Image.Image:
    """The image in `data`, turned upright from its EXIF orientation as fluxnb.data.checks turns training images."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def _upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header alone (no decoding)."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def unmasked(prepared: CheckedDataset) -> list[str]:
    """The sources of the images that have no mask: they train unmasked (all ones)."""
    return [i.record.source for i in prepared.items if i.record.mask is None and not i.sample.flip]


def check_masks(prepared: CheckedDataset) -> None:
    """Raises FluxnbError, in one line naming them, when masks cannot be read or are not the size of their image
    (such a mask could not be cropped like its image)."""
    bad = []
    for item in prepared.items:
        record = item.record
        if item.sample.flip or record.mask is None:  # a flip shares its record with its unflipped sample
            continue
        try:
            image, mask = _upright_size(record.read()), _upright_size(record.mask())
        except Exception as err:  # unreadable mask (the image itself was checked already)
            bad.append(f"{record.source} (mask unreadable: {type(err).__name__})")
            continue
        if image != mask:
            bad.append(f"{record.source} (image {image[0]}x{image[1]}, mask {mask[0]}x{mask[1]})")
    if bad:
        raise FluxnbError(f"{len(bad)} mask(s) cannot be used: {first_names(bad)}. Give each image a mask of "
                          "its own size (white = learn, black = ignore), or set masked_loss=False.")


def missing_note(missing: list[str]) -> str:
    return f"note: {len(missing)} image(s) have no mask and train unmasked (all white): {first_names(missing)}."


def latent_mask(item: Item, floor: float = 0.0) -> torch.Tensor:
    """The item's loss weight at its latent's size, (1, h, w) float32 in [floor, 1].

    The grey mask goes through the very transform of its image (fluxnb.data.buckets.fit_to_bucket: same bucket,
    same crop centering, same flip), then each latent pixel takes the mean of its 8x8 image pixels (area
    downsampling), so a latent pixel half on the subject weighs a half. All ones when the image has no mask.
    """
    s = item.sample
    h, w = s.height // LATENT_FACTOR, s.width // LATENT_FACTOR
    if item.record.mask is None:
        return torch.ones(1, h, w)
    grey = _upright(item.record.mask()).convert("L")
    fitted = fit_to_bucket(grey, (s.width, s.height), item.crop, s.id.removesuffix("-flip"), s.flip)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    weight = torch.nn.functional.avg_pool2d(pixels, LATENT_FACTOR)[0]  # (1, h, w)
    return floor + (1.0 - floor) * weight.clamp(0.0, 1.0)
