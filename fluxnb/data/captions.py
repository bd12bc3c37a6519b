"""Captions written for you: a folder of images -> metadata.jsonl beside them, by the configured captioner.

    plan = plan_captions(folder, cfg.data)             # which images need a caption (none is replaced unless
                                                       #   overwrite=True), before any model loads
    with captioner.loaded(cfg.data.captioner, hw) as model:       # freed on the way out, before T5 loads
        result = caption_folder(plan, model, trigger="mucha style", tokenizer=t5_tokenizer)

Which model, and how it is asked, is fluxnb.data.captioner's (Florence-2-large unless `data.captioner` names
another). The captions go to the folder's metadata.jsonl in the imagefolder layout that fluxnb.data.sources reads
(file_name + the caption column), written atomically; captions the user wrote (metadata rows, or .txt files
beside the images) are kept and copied in, unless overwrite. Every row the user wrote stays, as typed, where it
was: one for an image not copied in yet, a second row for one image, `./a.png` (the same file as `a.png`, so it
gets no second row); fluxnb only adds rows for images that have none and fills in captions. The tiny profile's
captioner (fluxnb.tiny.captioner) goes through the same code. FLUX.1-Kontext-dev's captions are editing
instructions ("make it ... style"), which a captioner looking at the target cannot write: with kontext, images
without one are an error naming them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ..base.errors import FluxnbError, first_names
from ..base.files import atomic_write_text
from ..base.temps import remove_abandoned_files
from ..config import DataConfig
from .captioner import loaded
from .checks import caption_problem, open_image, progress_bar, why_unreadable, with_instance_prompt
from .sources import images_in, metadata_rows

METADATA = "metadata.jsonl"


@dataclass
class CaptionPlan:
    """What captioning a folder will do: the rows of its metadata.jsonl and which of them get a caption."""

    folder: Path
    column: str  # the caption column (cfg.caption_column)
    rows: list[dict[str, Any]]  # metadata.jsonl rows to write: the user's own, in their order, then one per new image
    todo: list[int] = field(default_factory=list)  # indices into rows to caption
    kept: int = 0  # user-written captions kept as they are
    files: dict[int, str] = field(default_factory=dict)  # row index -> the image in the folder it names
    typed: dict[int, str] = field(default_factory=dict)  # row index -> the user's line, written back if unchanged

    def __str__(self) -> str:
        elsewhere = len(self.typed) - len(set(self.typed) & set(self.files))
        other = f", {elsewhere} row(s) naming no image in the folder kept as they are" if elsewhere else ""
        return (f"{self.folder}: {len(set(self.files.values()))} images, {len(self.todo)} to caption, {self.kept} "
                f"captions of yours kept{other}")


def _same_file(name: Any) -> str | None:
    """'./a.png', 'a.png', 'sub/../a.png' -> 'a.png': the one key of a file named relative to the folder."""
    return PurePath(os.path.normpath(name)).as_posix() if isinstance(name, str) and name else None


def _metadata_lines(folder: Path) -> list[tuple[dict, str]]:
    """The user's metadata.jsonl rows, each with its line as written; refused whole if a line is broken."""
    if (folder / "metadata.csv").is_file() and not (folder / METADATA).is_file():
        raise FluxnbError(f"{folder} has a metadata.csv: captioning writes {METADATA}; convert the CSV to "
                          f"{METADATA} (one JSON object per line) or caption a copy of the images without it.")
    if not (folder / METADATA).is_file():
        return []
    rows, errors = metadata_rows(folder / METADATA)
    if errors:
        raise FluxnbError(f"{folder / METADATA} has problems ({errors[0]}); fix it before captioning, so that "
                          "none of your captions is lost.")
    lines = [line for line in (folder / METADATA).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [(row, line) for (_, row), line in zip(rows, lines)]  # metadata_rows skips only blank lines


def _txt_captions(folder: Path, images: list[str], column: str) -> dict[str, dict]:
    """file name -> {column: caption} from the .txt files beside the images (a folder without metadata.jsonl)."""
    found = {}
    for name in images:
        txt = (folder / name).with_suffix(".txt")
        if txt.is_file():
            found[name] = {column: txt.read_text(encoding="utf-8-sig").strip()}
    return found


def plan_captions(folder: str | Path | None, cfg: DataConfig, *, overwrite: bool = False,
                  kontext: bool = False) -> CaptionPlan:
    """Every row the user wrote stays as written; each image with no row gets one. Rows naming an image in the
    folder with no usable caption (all of them with overwrite) are to be captioned. kontext (model.kontext): the
    control/ folder holds inputs, not images to caption, and an image to caption is an error (see above)."""
    folder = Path(cfg.dataset if folder is None else folder).expanduser()
    if not folder.is_dir():
        raise FluxnbError(f"captioning needs a local folder of images; {str(folder)!r} is not one (a Hub dataset "
                          "comes with its captions: set caption_column, or download its images to a folder).")
    theirs = _metadata_lines(folder)
    names = [p.relative_to(folder).as_posix() for p in images_in(folder, cfg, kontext=kontext)]
    if not names:
        raise FluxnbError(f"{folder} holds no images ({', '.join(('png', 'jpg', 'webp'))}, ...): nothing to caption.")
    plan, present = CaptionPlan(folder, cfg.caption_column, []), set(names)
    for row, line in theirs:  # a row for a file not there (yet), or a second row for one, is the user's to keep
        plan.typed[len(plan.rows)] = line
        name = _same_file(row.get("file_name", row.get(cfg.image_column)))  # the loader's rule (fluxnb.data.sources)
        _add(plan, row, name if name in present else None, overwrite)
    listed, texts = set(plan.files.values()), {} if theirs else _txt_captions(folder, names, cfg.caption_column)
    for name in names:
        if name not in listed:
            _add(plan, {"file_name": name, **texts.get(name, {})}, name, overwrite)
    if kontext and plan.todo:
        todo = [plan.files[i] for i in plan.todo]
        what = "would be captioned anew (overwrite)" if overwrite else "have no instruction"
        raise FluxnbError(f"{len(todo)} image(s) of {folder} {what}: {first_names(todo)}. "
                          "FLUX.1-Kontext-dev's captions say what to change (\"make it ... style\"), which a "
                          f"captioner cannot see: write one per pair in {METADATA} (or a .txt beside each image), "
                          "or set instance_prompt to give every pair the same instruction, and skip captioning.")
    return plan


def _add(plan: CaptionPlan, row: dict, image: str | None, overwrite: bool) -> None:
    """Append a row; one naming an image in the folder (`image`) is captioned if it has no usable caption."""
    if image is not None:
        plan.files[len(plan.rows)] = image
        if caption_problem(row.get(plan.column)) is None and not overwrite:
            plan.kept += 1
        else:
            plan.todo.append(len(plan.rows))
    plan.rows.append(row)


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
    """The folder's metadata.jsonl, whole or not at all: a row of the user's that nothing changed goes back as it
    was typed; a changed one keeps every other key, in its order."""
    path = plan.folder / METADATA
    remove_abandoned_files(plan.folder, [METADATA])  # what a killed write left: the only temporary fluxnb makes there
    lines = [plan.typed[i] if i in plan.typed and json.loads(plan.typed[i]) == row else
             json.dumps(row, ensure_ascii=False) for i, row in enumerate(plan.rows)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
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


def _open(plan: CaptionPlan, i: int) -> Any:
    """The RGB image of row i; FluxnbError naming its file when it cannot be read (PIL's own error names none)."""
    try:
        return open_image((plan.folder / plan.files[i]).read_bytes())[0]
    except Exception as err:  # unreadable, truncated, not an image, gone since it was planned
        raise FluxnbError(f"{plan.files[i]} in {plan.folder} cannot be captioned: {why_unreadable(err)}.") from None


def caption_folder(plan: CaptionPlan, captioner: Callable[[list], list[str]], *, trigger: str = "",
                   tokenizer: Any = None, max_sequence_length: int = 77, batch_size: int = 8,
                   progress: bool = True) -> CaptionResult:
    """Caption plan.todo in batches (`captioner`: PIL images -> one caption each, fluxnb.data.captioner.Captioner),
    put `trigger` before each new caption, write metadata.jsonl once at the end. Should captioning stop part-way
    (an unreadable image, out of memory, Ctrl-C), the captions made so far are written before the error goes on:
    the next plan_captions keeps them and lists only the images still without one."""
    result = CaptionResult(plan, None, [])
    todo = plan.todo
    bar = progress_bar(total=len(todo), desc="captioning", unit="image", show=progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [_open(plan, i) for i in batch]
            for i, text in zip(batch, captioner(images)):
                plan.rows[i][plan.column] = with_instance_prompt(trigger, text)
                result.captioned.append(plan.files[i])
            bar.update(len(batch))
    except BaseException:
        if result.captioned:
            print(f"captioning stopped after {len(result.captioned)} of {len(todo)} images: their captions are saved "
                  f"in {write_metadata(plan)}; run it again with overwrite off (OVERWRITE = False in notebook 01, "
                  "no --all on the command line) to caption only the rest.")
        raise
    finally:
        bar.close()
    if todo:
        result.written = write_metadata(plan)
    warning = length_warning(plan, tokenizer, max_sequence_length)
    result.warnings += [warning] if warning else []
    return result


def caption_step(run, *, folder: str | Path | None = None, overwrite: bool = False, trigger: str | None = None,
                 progress: bool = True) -> CaptionResult:
    """`python -m fluxnb caption`: plan, load the captioner only if needed, caption, free it."""
    from .embeddings import load_tokenizer

    cfg = run.config.data
    plan = plan_captions(folder or cfg.dataset, cfg, overwrite=overwrite, kontext=run.config.model.kontext)
    print(plan)
    remove_abandoned_files(plan.folder, [METADATA])  # also when nothing is left to caption
    tokenizer = load_tokenizer(run.config.model)
    if not plan.todo:
        result = CaptionResult(plan, None, [])
        warning = length_warning(plan, tokenizer, cfg.max_sequence_length)
        result.warnings += [warning] if warning else []
        return result
    with loaded(cfg.captioner, run.hw) as captioner:  # freed on the way out: T5 comes next
        return caption_folder(plan, captioner, trigger=cfg.instance_prompt if trigger is None else trigger,
                              tokenizer=tokenizer, max_sequence_length=cfg.max_sequence_length, progress=progress)
