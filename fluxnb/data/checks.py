"""Check a dataset before any model loads, and turn it into training samples keyed by content.

    prepared = check_dataset(run.config.data, tokenizer=t5_tokenizer)   # raises DataError listing every problem
    print(prepared.report)                                         # what was found, converted, skipped
    prepared.items[0].sample    # Sample(id=<hash of image bytes + caption>, caption, caption_id, bucket, flip)
    prepared.items[0].image()   # the RGB image resized + cropped to its bucket, as the VAE will see it

Loading FLUX.1-dev's T5 takes minutes; finding out afterwards that row 37 has no caption is a waste. So every
row is opened and checked here first, and all problems come back in one report: unreadable or truncated files,
colour modes that need converting, images smaller than their bucket, missing captions, captions T5 would
truncate, duplicates, FLUX.1-Kontext-dev pairs without a control. A sample's id hashes its image bytes and caption
(and a pair's control: fluxnb.data.pairs), so its cached latent and caption embedding are found by one id in any order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..base.errors import FluxnbError, first_names
from ..base.progress import Bar
from ..config import DataConfig
from .buckets import MODE_NOTES, Size, fit_to_bucket, is_smaller, make_buckets, nearest_bucket, to_rgb
from .pairs import no_controls, read_control
from .sources import NotInDataset, Record, load_records
from .store import Sample, caption_id, sample_id

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit (~89 MP, ~270 MB as RGB): refused beyond it


def progress_bar(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> Bar:
    """base.progress.Bar, a widget in notebooks; show=False silences it (TQDM_DISABLE=1, as in tests, still works)."""
    return Bar(iterable, **kwargs) if show else Bar(iterable, disable=True, **kwargs)


class DataError(FluxnbError, ValueError):
    """The dataset has problems the user must fix; the message is the whole report."""


def with_instance_prompt(instance_prompt: str, caption: str) -> str:
    """'tnyst style' + 'a red cat' -> 'tnyst style, a red cat' (unless the caption already starts with it)."""
    p = instance_prompt.strip()
    if not p or caption.startswith(p):
        return caption or p
    return f"{p}, {caption}" if caption else p


class TooManyPixels(ValueError):
    """An image far larger than training could use: refused from its header, before it is decoded."""


def open_image(data: bytes) -> tuple[Image.Image, str, bool]:
    """Decode fully (so truncation shows up now, not mid-training) -> (RGB image, original mode, rotated).

    The size is checked from the header first: a 10000x10000 scan would take GBs of RAM to decode (and PIL would
    only warn, as DecompressionBombWarning), for a picture that is shrunk to ~0.4 MP anyway."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below, with a clear message
        img = Image.open(io.BytesIO(data))  # reads the header only
    if img.width * img.height > MAX_PIXELS:
        raise TooManyPixels(f"{img.width}x{img.height} pixels ({img.width * img.height / 1e6:.0f} MP, more than "
                            f"{MAX_PIXELS / 1e6:.0f} MP): downscale it (e.g. to 2048 px on the long side) first")
    img.load()
    turned = img.getexif().get(0x0112, 1) != 1  # phone photos store "rotate me" in EXIF, not in the pixels
    return to_rgb(ImageOps.exif_transpose(img)), img.mode, turned


def why_unreadable(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, FileNotFoundError):
        return "file not found: add the file, or remove its line from the metadata"
    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can read (corrupt, or not an image format): re-export it as PNG/JPEG or delete it"
    if any(w in text.lower() for w in ("truncated", "broken data stream", "end of file")):
        return "truncated (the file ends early, e.g. an interrupted download): re-download it or delete it"
    if isinstance(err, (TooManyPixels, NotInDataset)):
        return text
    if isinstance(err, Image.DecompressionBombError):
        return "far too many pixels to open safely: downscale it first"
    return f"cannot be decoded ({type(err).__name__}: {text.splitlines()[0] if text else ''}): re-export or delete it"


@dataclass(frozen=True)
class Item:
    """One training sample and where its image comes from."""

    sample: Sample
    record: Record
    crop: str = "center"

    def image(self) -> Image.Image:
        """RGB, resized to cover the sample's bucket and cropped (flipped if a flip sample): (width, height)."""
        data, control = self.record.read(), self.record.control() if self.record.control else None
        if sample_id(data, self.sample.caption, flip=self.sample.flip, control=control) != self.sample.id:
            raise FluxnbError(f"{self.record.source} changed on disk since the dataset was checked: run the "
                              "check (data.check_dataset) again so its sample id matches its content.")
        rgb, _, _ = open_image(data)
        key = self.sample.id.removesuffix("-flip")  # a flip is the mirror of the very same crop
        return fit_to_bucket(rgb, (self.sample.width, self.sample.height), self.crop, key, self.sample.flip)


@dataclass
class DataReport:
    description: str
    rows: int = 0
    samples: int = 0  # without flips
    flips: int = 0
    buckets: Counter = field(default_factory=Counter)  # (w, h) -> images
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        flips = f" (+{self.flips} flipped copies)" if self.flips else ""
        lines = [f"Dataset: {self.description}: {self.rows} rows -> {self.samples} samples{flips} "
                 f"in {len(self.buckets)} bucket(s)"]
        if self.buckets:
            sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
            lines.append(f"  buckets (w x h: images): {sizes}")
        lines += [f"  note: {m}" for m in self.notes] + [f"  warning: {m}" for m in self.warnings]
        lines += [f"  skipped: {m}" for m in self.skipped] + [f"  ERROR: {m}" for m in self.errors]
        return "\n".join(lines)


@dataclass
class CheckedDataset:
    config: DataConfig
    items: list[Item]
    report: DataReport
    kontext: bool = False  # checked for FLUX.1-Kontext-dev: records carry their controls (fluxnb.data.controls)

    @property
    def samples(self) -> list[Sample]:
        return [item.sample for item in self.items]

    @property
    def captions(self) -> list[str]:
        """Unique captions in dataset order: what notebook 01 encodes."""
        return list(dict.fromkeys(s.caption for s in self.samples))

    def preview(self, n: int = 8) -> tuple[list[Image.Image], list[str]]:
        items = [i for i in self.items if not i.sample.flip][:n]
        return [i.image() for i in items], [i.sample.caption for i in items]


def caption_problem(raw: Any) -> str | None:
    """What is wrong with a raw caption value, or None when it is usable text."""
    if raw is None:
        return "missing"
    if not isinstance(raw, str):
        return f"not text: {type(raw).__name__} {raw!r:.30}"
    return "empty" if not raw.strip() else None


_TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"  # transformers' once-only warning flag


@contextlib.contextmanager
def quiet_length_warning(*tokenizers: Any) -> Iterator[None]:
    """Silence transformers' "Token indices sequence length is longer than the specified maximum" warning while
    captions are tokenized: the data report already names the long captions (and T5 truncates them on purpose).
    It is the tokenizer's own once-only flag, so no other warning is hidden; restored afterwards."""
    flags = [(t, t.deprecation_warnings.get(_TOO_LONG)) for t in tokenizers if hasattr(t, "deprecation_warnings")]
    for t, _ in flags:
        t.deprecation_warnings[_TOO_LONG] = True
    try:
        yield
    finally:
        for t, before in flags:
            t.deprecation_warnings[_TOO_LONG] = before or False


def check_dataset(cfg: DataConfig, tokenizer: Any = None, *, progress: bool = True,
                  kontext: bool = False) -> CheckedDataset:
    """Load every row of `cfg.dataset`, check it, and assign buckets. Raises DataError with the full report.
    kontext (model.kontext): the records carry their pairs' controls; a pair without one is an error here, an
    undecodable one in fluxnb.data.controls (notebook 02)."""
    loaded = load_records(cfg, kontext=kontext)
    report = DataReport(loaded.description, rows=len(loaded.records), notes=list(loaded.notes),
                        errors=list(loaded.errors))
    buckets = make_buckets(cfg.width, cfg.height, cfg.bucket_step) if cfg.buckets else [(cfg.width, cfg.height)]
    bad, no_caption, no_control, small, modes, rotated, items = [], [], [], [], Counter(), 0, []
    seen_ids, seen_images, dupes, same_image, instance_used = dict[str, str](), dict[str, str](), [], [], 0
    for record in progress_bar(loaded.records, show=progress, desc="checking images", unit="image"):
        try:
            data = record.read()
            img, mode, turned = open_image(data)
        except Exception as err:  # any decode failure is this file's problem, reported by name
            bad.append(f"{record.source}: {why_unreadable(err)}")
            continue
        control = read_control(record, no_control) if kontext else None  # all of a row's problems are reported
        problem = caption_problem(record.caption)
        if problem and not cfg.instance_prompt.strip():
            no_caption.append(f"{record.source} ({problem})")
            continue
        instance_used += problem is not None  # such rows are captioned with the instance prompt alone
        caption = with_instance_prompt(cfg.instance_prompt, "" if problem else " ".join(record.caption.split()))
        if mode != "RGB":
            modes[mode] += 1
        rotated += turned
        bucket: Size = nearest_bucket(*img.size, buckets) if cfg.buckets else buckets[0]
        if is_smaller(img.size, bucket):
            small.append(f"{record.source} {img.size[0]}x{img.size[1]} -> {bucket[0]}x{bucket[1]}")
            if cfg.small_images == "skip":
                continue
        sid = sample_id(data, caption, control=control)
        if sid in seen_ids:
            dupes.append(f"{record.source} = {seen_ids[sid]}")
            continue
        seen_ids[sid] = record.source
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_images:
            same_image.append(f"{record.source} = {seen_images[digest]}")
        seen_images.setdefault(digest, record.source)
        report.buckets[bucket] += 1
        for flip in (False, True) if cfg.flip else (False,):
            sample = Sample(sample_id(data, caption, flip=flip, control=control), caption, caption_id(caption),
                            record.source, bucket[0], bucket[1], flip)
            items.append(Item(sample, record, cfg.crop))
    _summarise(report, cfg, bad, no_caption, small, modes, rotated, dupes, same_image, instance_used)
    if no_control:
        report.errors.append(no_controls(no_control, cfg.control_column,
                                         unpaired=not any(r.control for r in loaded.records)))
    return _finish(CheckedDataset(cfg, items, report, kontext), tokenizer)


def _finish(prepared: CheckedDataset, tokenizer: Any) -> CheckedDataset:
    """The counts, the captions' T5 lengths and the empty case into the report; DataError if it names errors."""
    report, items = prepared.report, prepared.items
    report.samples = len({i.sample.id for i in items if not i.sample.flip})
    report.flips = len(items) - report.samples
    if tokenizer is not None:
        _check_lengths(report, prepared.config, tokenizer, prepared.captions)
    if not items and not report.errors:
        report.errors.append("no usable samples: the dataset is empty (or every row was skipped, see above). "
                             "Add images (.png, .jpg, .webp ...) with captions, or fix the rows listed.")
    if report.errors:
        raise DataError(str(report))
    return prepared


def _summarise(report: DataReport, cfg: DataConfig, bad: list[str], no_caption: list[str], small: list[str],
               modes: Counter, rotated: int, dupes: list[str], same_image: list[str], instance_used: int) -> None:
    if bad and cfg.bad_images == "error":
        report.errors.append(f"{len(bad)} image(s) cannot be used: {first_names(bad)}. (Set bad_images='skip' to "
                             "train without them.)")
    else:
        report.skipped += bad
    if no_caption:
        column = f"the '{cfg.caption_column}' column (or the .txt files)"
        report.errors.append(f"{len(no_caption)} row(s) have no usable caption: {first_names(no_caption)}. Fill in "
                             f"{column}, or set instance_prompt to use it as the caption of these rows.")
    if instance_used:
        report.notes.append(f"{instance_used} row(s) without a caption use the instance prompt "
                            f"{cfg.instance_prompt.strip()!r} as their caption.")
    if modes := +modes:
        kinds = ", ".join(f"{m} x{n} ({MODE_NOTES.get(m, 'converted')})" for m, n in modes.items())
        report.notes.append(f"{sum(modes.values())} image(s) are not 8-bit RGB and are converted to RGB: {kinds}.")
    if rotated:
        report.notes.append(f"{rotated} photo(s) turned upright from their EXIF orientation.")
    if small:
        verb = "are left out (small_images='skip')" if cfg.small_images == "skip" else (
            "will be upscaled, so they look blurrier; set small_images='skip' to leave them out, or lower width/height")
        report.warnings.append(f"{len(small)} image(s) are smaller than their bucket and {verb}: {first_names(small)}.")
    if dupes:
        report.notes.append(f"{len(dupes)} duplicate row(s) (same image and caption as an earlier row) left out: "
                            f"{first_names(dupes)}.")
    if same_image:
        report.notes.append(f"{len(same_image)} image(s) appear twice with different captions (both kept): "
                            f"{first_names(same_image)}.")


def _check_lengths(report: DataReport, cfg: DataConfig, tokenizer: Any, captions: list[str]) -> None:
    if not captions:
        return
    with quiet_length_warning(tokenizer):
        lengths = {c: len(ids) for c, ids in zip(captions, tokenizer(captions, truncation=False)["input_ids"])}
    long = {c: n for c, n in lengths.items() if n > cfg.max_sequence_length}
    if long:
        worst = max(long, key=long.get)
        report.warnings.append(
            f"{len(long)} of {len(captions)} caption(s) are longer than max_sequence_length="
            f"{cfg.max_sequence_length} T5 tokens (longest: {long[worst]} tokens, {worst[:60]!r}...). T5 sees only "
            f"the first {cfg.max_sequence_length}; raise max_sequence_length (up to 512; costs memory and time) "
            "to keep them whole.")
