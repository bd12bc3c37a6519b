"""Aspect-ratio buckets and the image transforms that put a picture into its bucket. Pure functions, no I/O.

FLUX trains on any size that is a multiple of 16 px (the VAE downsamples 8x, the transformer packs 2x2 latent
patches). Squashing every image into 512x768 would crop a landscape photo to a third of itself. Instead we make
a few "buckets": sizes of about the same area (so the same memory and speed per step) but different shapes,
and each image goes to the bucket whose aspect ratio is nearest its own; then it is resized to cover the
bucket and cropped, losing only a thin margin.

    make_buckets(512, 768)  ->  [(448, 832), (512, 768), (512, 704), (576, 640), (640, 576), ... (832, 448)]
    nearest_bucket(1200, 800, buckets) -> (768, 512)
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageOps

Size = tuple[int, int]  # (width, height) in pixels, like PIL


def make_buckets(width: int, height: int, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Sizes with area <= width*height, sides multiples of `step` (plus the target itself and its transpose).

    For each width w = step, 2*step, ... the height is the largest multiple of `step` that keeps the area under
    the target's; shapes more elongated than `max_ratio`:1 are dropped. Sorted from tallest to widest.
    """
    for name, value in (("width", width), ("height", height), ("step", step)):
        if not (isinstance(value, int) and value > 0 and value % 16 == 0):
            raise ValueError(f"{name}={value!r} must be a positive multiple of 16.")
    if max_ratio < 1:
        raise ValueError(f"max_ratio={max_ratio!r} must be >= 1.")
    area = width * height
    sizes = {(width, height), (height, width)}
    w = step
    while area // w >= step:
        h = area // w // step * step
        if max(w / h, h / w) <= max_ratio:
            sizes |= {(w, h), (h, w)}
        w += step
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to width/height (in log space, so 2:1 and 1:2 are equally far
    from square); among equal ratios, the largest."""
    if not buckets:
        raise ValueError("no buckets to choose from.")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def is_smaller(size: Size, bucket: Size) -> bool:
    """True when filling `bucket` needs upscaling (blurrier than the real thing)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return scale > 1.0


# Modes PIL opens, and what to_rgb does with them (said once in the data report).
MODE_NOTES = {
    "RGBA": "transparency put on white", "LA": "grayscale + transparency put on white", "P": "palette",
    "PA": "palette + transparency put on white", "CMYK": "print colours", "L": "grayscale", "1": "black and white",
    "I;16": "16-bit, scaled to 8-bit", "I;16B": "16-bit, scaled to 8-bit", "I;16L": "16-bit, scaled to 8-bit",
    "I": "32-bit integer, scaled to 8-bit", "F": "floating point, scaled to 8-bit", "YCbCr": "YCbCr",
}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit "L". PIL's own convert clips (most of a 16-bit photo turns white)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    else:
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(a * 255.0 / top, 0, 255).round().astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited on white, 16-bit scaled, palette expanded."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if (img.mode in ("P", "L", "RGB") and "transparency" in img.info) or img.mode in ("PA", "LA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def crop_centering(crop: str, key: str) -> tuple[float, float]:
    """Where to cut: the middle, or a random spot fixed by `key` (so a re-run caches the same crop)."""
    if crop == "center":
        return (0.5, 0.5)
    rng = random.Random(key)
    return (rng.random(), rng.random())


def fit_to_bucket(img: Image.Image, bucket: Size, crop: str = "center", key: str = "",
                  flip: bool = False) -> Image.Image:
    """Resize `img` (RGB) to cover `bucket`, crop the overflow, optionally mirror left-right. -> bucket-sized image."""
    out = ImageOps.fit(img, bucket, method=Image.Resampling.LANCZOS, centering=crop_centering(crop, key))
    return ImageOps.mirror(out) if flip else out
