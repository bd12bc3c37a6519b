"""The tiny profile's dataset: 16 drawn images in one flat style (cream ground, burgundy frame, ochre dots, thick
ink outlines), captioned with the trigger word, in datasets' imagefolder layout; and the validation prompts.
A LoRA trained on it should learn the palette, the frame and the outlines.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER_WORD = "tnyst"
# Palette of the dataset "style": a LoRA should learn these colours, the border and outlines.
CREAM, INK = (241, 229, 201), (38, 30, 28)
TEAL, OCHRE, BURGUNDY = (22, 96, 102), (205, 146, 44), (122, 30, 48)
PALETTE = (CREAM, INK, TEAL, OCHRE, BURGUNDY)

# Subject drawings in unit coordinates of the area inside the border: (kind, fill, coords).
_Shape = tuple[str, tuple[int, int, int], tuple[float, ...]]
SUBJECTS: list[tuple[str, str, list[_Shape]]] = [
    ("sun", "a round sun over rolling hills", [
        ("ellipse", OCHRE, (0.25, 0.1, 0.75, 0.45)), ("chord", TEAL, (-0.3, 0.6, 0.7, 1.4)),
        ("chord", BURGUNDY, (0.3, 0.7, 1.3, 1.5))]),
    ("mountain", "a tall mountain with a snowy peak", [
        ("polygon", TEAL, (0.0, 0.95, 0.5, 0.15, 1.0, 0.95)),
        ("polygon", CREAM, (0.38, 0.36, 0.5, 0.15, 0.62, 0.36))]),
    ("flower", "a flower with round petals", [
        ("ellipse", BURGUNDY, (0.2, 0.1, 0.5, 0.35)), ("ellipse", BURGUNDY, (0.5, 0.1, 0.8, 0.35)),
        ("ellipse", BURGUNDY, (0.2, 0.3, 0.5, 0.55)), ("ellipse", BURGUNDY, (0.5, 0.3, 0.8, 0.55)),
        ("ellipse", OCHRE, (0.38, 0.24, 0.62, 0.42)), ("rectangle", TEAL, (0.46, 0.55, 0.54, 0.95))]),
    ("waves", "ocean waves under a calm sky", [
        ("chord", TEAL, (0.0, 0.4, 0.5, 0.7)), ("chord", TEAL, (0.5, 0.4, 1.0, 0.7)),
        ("rectangle", TEAL, (0.0, 0.55, 1.0, 1.0)), ("ellipse", OCHRE, (0.6, 0.05, 0.9, 0.25))]),
    ("house", "a small house with a red roof", [
        ("rectangle", OCHRE, (0.2, 0.45, 0.8, 0.9)), ("polygon", BURGUNDY, (0.1, 0.45, 0.5, 0.15, 0.9, 0.45)),
        ("rectangle", TEAL, (0.42, 0.65, 0.58, 0.9))]),
    ("tree", "a round tree on a little hill", [
        ("chord", OCHRE, (-0.2, 0.75, 1.2, 1.3)), ("rectangle", BURGUNDY, (0.44, 0.45, 0.56, 0.82)),
        ("ellipse", TEAL, (0.15, 0.1, 0.85, 0.55))]),
    ("moon", "a crescent moon and two stars", [
        ("ellipse", OCHRE, (0.2, 0.2, 0.8, 0.6)), ("cutout", CREAM, (0.35, 0.15, 0.95, 0.55)),
        ("polygon", TEAL, (0.15, 0.75, 0.2, 0.65, 0.25, 0.75, 0.2, 0.85)),
        ("polygon", BURGUNDY, (0.7, 0.8, 0.75, 0.7, 0.8, 0.8, 0.75, 0.9))]),
    ("fish", "a fish swimming in the water", [
        ("ellipse", OCHRE, (0.15, 0.35, 0.7, 0.65)), ("polygon", BURGUNDY, (0.65, 0.5, 0.9, 0.35, 0.9, 0.65)),
        ("ellipse", INK, (0.27, 0.44, 0.33, 0.5)), ("line", TEAL, (0.0, 0.85, 1.0, 0.85))]),
    ("boat", "a sailboat on the sea", [
        ("polygon", BURGUNDY, (0.15, 0.6, 0.85, 0.6, 0.7, 0.75, 0.3, 0.75)),
        ("polygon", OCHRE, (0.5, 0.1, 0.5, 0.55, 0.8, 0.55)), ("rectangle", TEAL, (0.0, 0.75, 1.0, 1.0))]),
    ("bird", "a bird sitting on a branch", [
        ("line", BURGUNDY, (0.0, 0.7, 1.0, 0.6)), ("ellipse", TEAL, (0.25, 0.3, 0.7, 0.62)),
        ("ellipse", TEAL, (0.55, 0.2, 0.8, 0.4)), ("polygon", OCHRE, (0.8, 0.27, 0.95, 0.3, 0.8, 0.34))]),
    ("cactus", "a cactus in a clay pot", [
        ("rectangle", TEAL, (0.4, 0.15, 0.6, 0.7)), ("rectangle", TEAL, (0.2, 0.3, 0.3, 0.5)),
        ("rectangle", TEAL, (0.7, 0.25, 0.8, 0.45)),
        ("polygon", BURGUNDY, (0.25, 0.65, 0.75, 0.65, 0.65, 0.95, 0.35, 0.95))]),
    ("lighthouse", "a striped lighthouse on a rock", [
        ("chord", INK, (0.05, 0.8, 0.95, 1.2)),
        ("polygon", CREAM, (0.35, 0.85, 0.4, 0.2, 0.6, 0.2, 0.65, 0.85)),
        ("rectangle", BURGUNDY, (0.38, 0.4, 0.62, 0.5)), ("rectangle", BURGUNDY, (0.36, 0.62, 0.64, 0.72)),
        ("ellipse", OCHRE, (0.38, 0.05, 0.62, 0.22))]),
    ("cup", "a cup of tea with steam", [
        ("rectangle", TEAL, (0.25, 0.45, 0.7, 0.85)), ("ellipse", TEAL, (0.62, 0.52, 0.85, 0.72)),
        ("line", OCHRE, (0.4, 0.1, 0.45, 0.38)), ("line", OCHRE, (0.55, 0.1, 0.5, 0.38))]),
    ("mushroom", "a mushroom with white spots", [
        ("chord", BURGUNDY, (0.1, 0.2, 0.9, 0.8)), ("rectangle", OCHRE, (0.4, 0.5, 0.6, 0.9)),
        ("ellipse", CREAM, (0.3, 0.3, 0.4, 0.38)), ("ellipse", CREAM, (0.58, 0.28, 0.68, 0.36))]),
    ("balloon", "a hot air balloon above the clouds", [
        ("ellipse", BURGUNDY, (0.25, 0.05, 0.75, 0.5)), ("rectangle", OCHRE, (0.42, 0.55, 0.58, 0.65)),
        ("ellipse", CREAM, (0.05, 0.75, 0.5, 0.9)), ("ellipse", TEAL, (0.5, 0.7, 0.95, 0.88))]),
    ("snail", "a snail on a green leaf", [
        ("chord", TEAL, (0.05, 0.7, 0.95, 1.0)), ("rectangle", OCHRE, (0.15, 0.66, 0.85, 0.76)),
        ("ellipse", BURGUNDY, (0.3, 0.35, 0.7, 0.7)), ("ellipse", OCHRE, (0.42, 0.45, 0.58, 0.6))]),
]
# (width, height): mostly the blog's 512x768 at 1/8, a few others so bucketing gets exercised.
_SIZE_OVERRIDES = {2: (96, 64), 6: (80, 80), 9: (128, 192), 13: (96, 64)}
DEFAULT_SIZE = (64, 96)
VALIDATION_PROMPTS = [f"{p}, {TRIGGER_WORD} style" for p in (
    "a cat sleeping on a blue chair", "a castle on a hill at night",
    "a bicycle leaning against a tree", "a portrait of an old man with a hat")]
def captions() -> list[str]:
    return [f"{text}, {TRIGGER_WORD} style" for _, text, _ in SUBJECTS]


def draw(shapes: list[_Shape], size: tuple[int, int]) -> Image.Image:
    """Cream ground, burgundy frame with ochre dots, flat fills with thick dark outlines."""
    w, h = size
    img = Image.new("RGB", size, CREAM)
    d = ImageDraw.Draw(img)  # no anti-aliasing: every pixel is a palette colour
    b, lw = max(3, w // 16), max(2, w // 32)  # border and outline thickness scale with the image
    x0, y0, iw, ih = b + lw, b + lw, w - 2 * (b + lw), h - 2 * (b + lw)
    for kind, fill, coords in shapes:
        pts = [round(x0 + v * iw) if i % 2 == 0 else round(y0 + v * ih) for i, v in enumerate(coords)]
        if kind == "line":
            d.line(pts, fill=INK, width=lw + 2)
            d.line(pts, fill=fill, width=max(1, lw - 1))
        elif kind == "polygon":
            d.polygon(pts, fill=fill, outline=INK, width=lw)
        elif kind == "chord":
            d.chord(pts, 180, 360, fill=fill, outline=INK, width=lw)
        elif kind == "cutout":  # background-coloured bite out of a shape (crescent moon)
            d.ellipse(pts, fill=fill)
        else:
            getattr(d, kind)(pts, fill=fill, outline=INK, width=lw)
    # Frame last, so shapes that overflow the inner area get clipped by it.
    d.rectangle((0, 0, w - 1, h - 1), outline=BURGUNDY, width=b)
    for x in range(b, w - b + 1, 2 * b):  # decorative ochre dots along the frame
        for y in (b // 2, h - 1 - b // 2):
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=OCHRE)
    for y in range(b, h - b + 1, 2 * b):
        for x in (b // 2, w - 1 - b // 2):
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=OCHRE)
    return img


def save_dataset(dataset_dir: Path) -> None:
    dataset_dir.mkdir(parents=True)
    rows = []
    for i, ((name, _, shapes), caption) in enumerate(zip(SUBJECTS, captions())):
        file_name = f"{i:02d}_{name}.png"
        draw(shapes, _SIZE_OVERRIDES.get(i, DEFAULT_SIZE)).save(
            dataset_dir / file_name, format="PNG", optimize=False, compress_level=9)
        rows.append(json.dumps({"file_name": file_name, "text": caption}, sort_keys=True))
    (dataset_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
