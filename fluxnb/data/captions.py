"""Captions written for you: a folder of images -> metadata.jsonl beside them, captioned by BLIP.

    plan = plan_captions(folder, cfg.data)                 # which images need a caption (none is replaced unless
    captioner = load_captioner(cfg.data.captioner, hw)     #   overwrite=True), before any model loads
    result = caption_folder(plan, captioner, trigger="mucha style", tokenizer=t5_tokenizer)
    memory.free(captioner.model)                           # before T5 loads (notebook 01)

The model is Salesforce/blip-image-captioning-large (BlipForConditionalGeneration, in transformers itself: no
trust_remote_code; 470 M parameters, under 1 GB in fp16, so a T4 holds it with room to spare). The captions go to
the folder's metadata.jsonl in the imagefolder layout that fluxnb.data.sources reads (file_name + the caption
column), written atomically; captions the user wrote (metadata rows, or .txt files beside the images) are kept
and copied in, unless overwrite. The tiny profile's captioner (fluxnb.tiny.captioner) goes through the same code.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.errors import FluxnbError
from ..base.files import atomic_write_text
from ..base.hub_errors import hub_errors
from ..config import DataConfig
from .checks import caption_problem, open_image, progress_bar, with_instance_prompt
from .sources import images_in, metadata_rows

METADATA = "metadata.jsonl"
GENERATION = {"max_new_tokens": 40, "num_beams": 3, "repetition_penalty": 1.3}  # short, non-repeating sentences


@dataclass
class CaptionPlan:
    """What captioning a folder will do: every image's row (kept in folder order) and which rows get a caption."""

    folder: Path
    column: str  # the caption column (cfg.caption_column)
    rows: list[dict[str, Any]]  # metadata.jsonl rows to write, one per image: {"file_name": ..., column: ...}
    todo: list[int] = field(default_factory=list)  # indices into rows to caption
    kept: int = 0  # user-written captions kept as they are

    def __str__(self) -> str:
        return (f"{self.folder}: {len(self.rows)} images, {len(self.todo)} to caption, {self.kept} captions of yours "
                f"kept")


def _user_captions(folder: Path, column: str) -> dict[str, Any]:
    """file_name -> caption the user wrote, from metadata.jsonl or from .txt files beside the images."""
    if (folder / "metadata.csv").is_file() and not (folder / METADATA).is_file():
        raise FluxnbError(f"{folder} has a metadata.csv: captioning writes {METADATA}; convert the CSV to "
                          f"{METADATA} (one JSON object per line) or caption a copy of the images without it.")
    if (folder / METADATA).is_file():
        rows, errors = metadata_rows(folder / METADATA)
        if errors:
            raise FluxnbError(f"{folder / METADATA} has problems ({errors[0]}); fix it before captioning, so that "
                              "none of your captions is lost.")
        return {row["file_name"]: row for _, row in rows if isinstance(row.get("file_name"), str)}
    found = {}
    for image in images_in(folder):
        txt = image.with_suffix(".txt")
        if txt.is_file():
            found[image.relative_to(folder).as_posix()] = {column: txt.read_text(encoding="utf-8-sig").strip()}
    return found


def plan_captions(folder: str | Path | None, cfg: DataConfig, *, overwrite: bool = False) -> CaptionPlan:
    """Every image in the folder; those with no usable caption (all of them with overwrite) are to be captioned."""
    folder = Path(cfg.dataset if folder is None else folder).expanduser()
    if not folder.is_dir():
        raise FluxnbError(f"captioning needs a local folder of images; {str(folder)!r} is not one (a Hub dataset "
                          "comes with its captions: set caption_column, or download its images to a folder).")
    users = _user_captions(folder, cfg.caption_column)
    names = [p.relative_to(folder).as_posix() for p in images_in(folder)]
    if not names:
        raise FluxnbError(f"{folder} holds no images ({', '.join(('png', 'jpg', 'webp'))}, ...): nothing to caption.")
    plan = CaptionPlan(folder, cfg.caption_column, [])
    for name in names:
        row = {**users.get(name, {}), "file_name": name}
        usable = caption_problem(row.get(cfg.caption_column)) is None
        if usable and not overwrite:
            plan.kept += 1
        else:
            plan.todo.append(len(plan.rows))
        plan.rows.append(row)
    return plan


@dataclass
class Captioner:
    processor: Any  # BlipProcessor: resizes to 384 px and normalises; decodes token ids
    model: Any  # BlipForConditionalGeneration, eval mode, on the device in the compute dtype
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with _one_thread(self.model):
            ids = self.model.generate(pixel_values=inputs["pixel_values"].to(self.dtype), **GENERATION)  # (B, <= 41)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


@contextlib.contextmanager
def _one_thread(model):
    """The tiny captioner is 32 wide: on the CPU, thread hand-offs cost more than its math (many times over on
    2 busy cores), as for the tiny FLUX (fluxnb.train.loop.cpu_threads). Real models keep every thread."""
    small = model.device.type == "cpu" and model.config.text_config.hidden_size <= 64
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_captioner(model_id: str, hw) -> Captioner:
    """BLIP in the run's compute dtype (fp16 on a T4, bf16 where the GPU has it, fp32 on the CPU)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    with hub_errors(model_id):
        processor = BlipProcessor.from_pretrained(model_id)
        model = BlipForConditionalGeneration.from_pretrained(model_id, dtype=hw.dtype)
    return Captioner(processor, model.to(hw.device).eval(), hw.device, hw.dtype)


@dataclass
class CaptionResult:
    plan: CaptionPlan
    written: Path | None  # the metadata.jsonl, or None when nothing needed a caption
    captioned: list[str]  # the file names captioned this time
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.captioned)} captioned, {self.plan.kept} of yours kept"
                 + (f" -> {self.written}" if self.written else "")]
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings])


def write_metadata(plan: CaptionPlan) -> Path:
    """The folder's metadata.jsonl, whole or not at all; every other key of a user's rows is kept."""
    path = plan.folder / METADATA
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in plan.rows))
    return path


def long_captions(captions: list[str], tokenizer: Any, max_sequence_length: int) -> list[tuple[str, int]]:
    """(caption, T5 tokens) for every caption that T5's max_sequence_length would cut."""
    if tokenizer is None or not captions:
        return []
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False)["input_ids"]]
    return [(c, n) for c, n in zip(captions, lengths) if n > max_sequence_length]


def length_warning(plan: CaptionPlan, tokenizer: Any, max_sequence_length: int) -> str | None:
    long = long_captions([r[plan.column] for r in plan.rows if isinstance(r.get(plan.column), str)], tokenizer,
                         max_sequence_length)
    if not long:
        return None
    caption, n = max(long, key=lambda cn: cn[1])
    return (f"{len(long)} caption(s) are longer than max_sequence_length={max_sequence_length} T5 tokens (longest "
            f"{n}: {caption[:60]!r}...): T5 will see only the start; shorten them or raise max_sequence_length.")


def caption_folder(plan: CaptionPlan, captioner: Captioner, *, trigger: str = "", tokenizer: Any = None,
                   max_sequence_length: int = 77, batch_size: int = 8, progress: bool = True) -> CaptionResult:
    """Caption plan.todo in batches, put `trigger` before each new caption, write metadata.jsonl once at the end."""
    result = CaptionResult(plan, None, [])
    todo = plan.todo
    bar = progress_bar(total=len(todo), desc="captioning", unit="image", show=progress)
    for start in range(0, len(todo), batch_size):
        rows = [plan.rows[i] for i in todo[start : start + batch_size]]
        images = [open_image((plan.folder / r["file_name"]).read_bytes())[0] for r in rows]
        for row, text in zip(rows, captioner(images)):
            row[plan.column] = with_instance_prompt(trigger, text)
            result.captioned.append(row["file_name"])
        bar.update(len(rows))
    bar.close()
    if todo:
        result.written = write_metadata(plan)
    warning = length_warning(plan, tokenizer, max_sequence_length)
    result.warnings += [warning] if warning else []
    return result


def caption_step(run, *, folder: str | Path | None = None, overwrite: bool = False, trigger: str | None = None,
                 progress: bool = True) -> CaptionResult:
    """`python -m fluxnb caption`: plan, load the captioner only if needed, caption, free it."""
    from ..base import memory
    from .embeddings import load_tokenizer

    cfg = run.config.data
    plan = plan_captions(folder or cfg.dataset, cfg, overwrite=overwrite)
    print(plan)
    tokenizer = load_tokenizer(run.config.model)
    if not plan.todo:
        result = CaptionResult(plan, None, [])
        warning = length_warning(plan, tokenizer, cfg.max_sequence_length)
        result.warnings += [warning] if warning else []
        return result
    captioner = load_captioner(cfg.captioner, run.hw)
    try:
        return caption_folder(plan, captioner, trigger=cfg.instance_prompt if trigger is None else trigger,
                              tokenizer=tokenizer, max_sequence_length=cfg.max_sequence_length, progress=progress)
    finally:
        memory.free(captioner.model)  # T5 comes next: the captioner must not sit beside it
