"""Share the LoRA on the Hugging Face Hub: a model card, the files, and an upload that is a dry run by default.

    settings = HubSettings(repo_id="mucha-flux-lora")   # "name" goes to your account, or "user-or-org/name"
    staged = stage(run, settings)                        # RUN/hub/: exactly what would be uploaded
    print(staged)                                        # the file list; staged.card is the model card
    result = push(run, staged, settings)                 # dry run unless settings.dry_run=False AND logged in

The token stays with huggingface_hub, which reads it itself (HF_TOKEN, or what `notebook_login()` / `hf auth login`
stored). fluxnb only asks whether there is one; it never passes it on, writes it to a file or prints it, and
scrubs it out of error messages.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import FluxnbError
from ..base.files import atomic_write_bytes, atomic_write_text
from ..infer.export import comfyui_name, export_lora, left_out, left_out_note, read_lora
from ..model.lora import file_type
from ..run import LORA_FILE, Run, writes
from .card import card_text, gallery


@dataclass
class HubSettings:
    """Where and how to share; notebook 05 edits it with a widget form."""

    repo_id: str = "flux-lora"  # "name" (your account) or "user-or-org/name"
    private: bool = True  # private until you decide otherwise on the Hub
    dry_run: bool = True  # list what would be uploaded; set False (and log in) to upload
    trigger_word: str = ""  # "" = found from the run's captions (fluxnb.share.card.trigger_word)
    commit_message: str = "Upload FLUX.1 LoRA trained with fluxnb"

    def __post_init__(self) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as err:
            raise FluxnbError(f"repo_id {self.repo_id!r} is not a valid Hub name: {err}") from None


def default_settings(run: Run) -> HubSettings:
    """A repo name from the run folder's ("my run (v2)" -> "my-run-v2-flux-lora"), valid on the Hub whatever the
    folder is called (letters, digits, '-', '_', '.', no '--' or '..', 96 at most), so notebook 05 reaches its form."""
    suffix = "-flux-lora"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.path.resolve().name)
    name = re.sub(r"[-.]{2,}", lambda m: m.group()[0], name)[: 96 - len(suffix)].strip("-.")
    return HubSettings(repo_id=f"{name}{suffix}" if name else suffix.lstrip("-"))


@dataclass
class Staged:
    """RUN/hub/ as it would be uploaded: every file (path in the repo, bytes) and the card."""

    folder: Path
    files: list[tuple[str, int]]
    card: str
    repo_id: str
    private: bool
    comfy_file: str
    images: list[dict]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'private' if self.private else 'PUBLIC'} model repo '{self.repo_id}' <- {self.folder} "
                 f"({len(self.files)} files, {sum(n for _, n in self.files) / 2**20:.1f} MiB):"]
        lines += [f"  {name:<44} {size / 2**10:10.1f} KiB" for name, size in self.files]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


@writes("stage for the Hub")
def stage(run: Run, settings: HubSettings) -> Staged:
    """Rebuild RUN/hub/ (a derived folder) with the card, both LoRA files and the sample images."""
    lora = run.dir.lora_file
    if not lora.is_file():
        raise FluxnbError(f"{lora} does not exist: train the LoRA first (notebook 03 / `python -m fluxnb train`).")
    folder = run.dir.hub
    shutil.rmtree(folder, ignore_errors=True)
    _copy(lora, folder / LORA_FILE)
    comfy = comfyui_name(run.dir)
    export_lora(lora, "comfyui", folder / comfy)
    images, notes = gallery(run), []
    for name in [n for im in images for n in (im["file"], im.get("input")) if n]:  # Kontext: and its input
        _copy(run.dir.gallery / name, folder / "images" / name)
    if run.dir.comparison.is_file():
        _copy(run.dir.comparison, folder / "images" / run.dir.comparison.name)
    if not images:
        notes.append("no sample images yet: run notebook 04 to add a gallery to the card")
    if file_type(lora) == "lora" and (dropped := left_out(read_lora(lora))):
        notes.append(left_out_note(dropped))
    card = card_text(run, settings.trigger_word, comfy, images, settings.repo_id)
    atomic_write_text(folder / "README.md", card)
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return Staged(folder, files, card, settings.repo_id, settings.private, comfy, images, notes)


@dataclass
class PushResult:
    uploaded: bool
    message: str
    url: str | None = None

    def __str__(self) -> str:
        return self.message


def scrub(text: str) -> str:
    """Remove the token (and anything shaped like a Hub token) from a message before it is shown."""
    import re

    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "hf_***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def upload_blocker() -> str | None:
    """Why a real upload cannot happen here (offline, or not logged in), or None. Never looks at the token's value
    beyond whether there is one."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "the Hub is unreachable from here (offline mode: HF_HUB_OFFLINE is set)"
    if not get_token():
        return ("not logged in: run `hf auth login` in a terminal (in a notebook `from huggingface_hub import "
                "notebook_login; notebook_login()`, or set HF_TOKEN) with a token that has write access")
    return None


@writes("push")
def push(run: Run, staged: Staged, settings: HubSettings) -> PushResult:
    """Upload RUN/hub/ to the repo (created private by default), or say why nothing was uploaded. Prints nothing:
    the caller has shown `staged` (the file list) and its card already."""
    where = f"the {len(staged.files)} files of {staged.folder} to the {'private' if settings.private else 'PUBLIC'} repo " \
            f"'{settings.repo_id}'"
    if settings.dry_run:
        return PushResult(False, f"dry run: nothing was uploaded. To upload {where}, turn dry run off (untick it in "
                                 "the form; on the command line leave out --dry-run) and log in.")
    blocker = upload_blocker()
    if blocker:
        return PushResult(False, f"nothing was uploaded: {blocker}.")
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from the environment or huggingface_hub's own login store
    try:
        repo = api.create_repo(settings.repo_id, private=settings.private, exist_ok=True, repo_type="model")
        if api.repo_info(repo.repo_id).private != settings.private:  # create_repo keeps an existing repo's visibility
            want, have = ("private", "public") if settings.private else ("public", "private")
            return PushResult(False, f"{repo.repo_id} already exists and is {have}, but {want} was asked for: nothing "
                                     f"was uploaded. Change its visibility in its settings on the Hub, or pick "
                                     f"another repo id.")
        if repo.repo_id != settings.repo_id:  # "name" became "user/name": the card's code snippet needs the full id
            atomic_write_text(staged.folder / "README.md",
                              card_text(run, settings.trigger_word, staged.comfy_file, staged.images, repo.repo_id))
        api.upload_folder(repo_id=repo.repo_id, folder_path=staged.folder, repo_type="model",
                          commit_message=settings.commit_message)
    except Exception as err:  # network down, no write access, name taken: nothing published, say why
        return PushResult(False, f"upload failed, no files were published: {scrub(f'{type(err).__name__}: {err}')}")
    url = f"https://huggingface.co/{repo.repo_id}"
    return PushResult(True, f"uploaded {len(staged.files)} files to {url} ({'private' if settings.private else 'public'})", url)
