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

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..data.store import read_samples
from ..errors import FluxnbError
from ..files import atomic_write_bytes, atomic_write_text
from ..infer.export import comfyui_name, export_lora
from ..run import LORA_FILE, Run, writes
from ..train.monitor import MetricsLog

LICENSES = {  # base model -> (license, license_name, license_link): a LoRA inherits its base model's terms
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license",
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
}
TAGS = ["text-to-image", "diffusers", "lora", "flux", "flux-diffusers", "template:sd-lora", "qlora", "fluxnb"]


@dataclass
class HubSettings:
    """Where and how to share; notebook 05 edits it with a widget form."""

    repo_id: str = "flux-lora"  # "name" (your account) or "user-or-org/name"
    private: bool = True  # private until you decide otherwise on the Hub
    dry_run: bool = True  # list what would be uploaded; set False (and log in) to upload
    trigger_word: str = ""  # "" = found from the run's captions (see trigger_word)
    commit_message: str = "Upload FLUX.1 LoRA trained with fluxnb"

    def __post_init__(self) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as err:
            raise FluxnbError(f"repo_id {self.repo_id!r} is not a valid Hub name: {err}") from None


def default_settings(run: Run) -> HubSettings:
    return HubSettings(repo_id=f"{run.path.resolve().name}-flux-lora")


def trigger_word(run: Run) -> str | None:
    """The instance prompt if one was set, else the last phrase shared by every caption and validation prompt."""
    data = run.config.data
    if data.instance_prompt.strip():
        return data.instance_prompt.strip()
    texts = list(data.validation_prompts)
    if run.dir.samples.is_file():
        texts += [s.caption for s in read_samples(run.dir)]
    tails = {t.rsplit(",", 1)[-1].strip().lower() for t in texts}
    return tails.pop() if len(tails) == 1 and "," in texts[0] else None


def _public_name(value: str | None) -> str | None:
    """Hub ids stay; local folders (which would leak your paths) become 'a local folder', existing or not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value is None:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return "a local folder"
    return "a local folder" if Path(value).expanduser().exists() or value.startswith((".", "~")) else value


def training_summary(run: Run) -> dict[str, object]:
    """The settings a reader needs to reproduce the LoRA, with no local paths."""
    c = run.config
    rows = MetricsLog(run.dir.metrics).read()
    steps = rows[-1].get("step") if rows else None
    return {"base model": _public_name(c.model.model_id), "dataset": _public_name(c.data.dataset),
            "resolution": f"{c.data.width}x{c.data.height}", "quantization": c.model.quantization,
            "LoRA rank": c.lora.rank, "LoRA alpha": c.lora.alpha, "LoRA targets": c.lora.targets,
            "optimizer": c.train.optimizer, "learning rate": c.train.learning_rate, "lr scheduler": c.train.lr_scheduler,
            "batch size": c.train.batch_size, "gradient accumulation": c.train.gradient_accumulation_steps,
            "optimizer steps (planned)": c.train.max_train_steps, "optimizer steps (done)": steps,
            "weighting scheme": c.train.weighting_scheme, "guidance scale (training)": c.train.guidance_scale,
            "gradient checkpointing": c.train.gradient_checkpointing, "seed": c.train.seed}


def gallery(run: Run) -> list[dict]:
    """Notebook 04's LoRA images with their prompts ([] when notebook 04 has not been run)."""
    index = run.dir.gallery / "prompts.json"
    return json.loads(index.read_text()) if index.is_file() else []


def card_text(run: Run, settings: HubSettings, comfy_file: str, images: list[dict], repo_id: str | None = None) -> str:
    """The model card: YAML header (base model, license, tags, widget gallery) + how to use it + how it was made."""
    from huggingface_hub import ModelCardData

    c, repo_id = run.config, repo_id or settings.repo_id
    base = _public_name(c.model.model_id)
    license_, license_name, license_link = LICENSES.get(c.model.model_id, ("other", None, None))
    trigger = settings.trigger_word.strip() or trigger_word(run)
    on_hub = base != "a local folder"
    data = ModelCardData(
        base_model=base if on_hub else None, license=license_, license_name=license_name,
        license_link=license_link, library_name="diffusers", pipeline_tag="text-to-image", tags=TAGS,
        instance_prompt=trigger, widget=[{"text": im["prompt"], "output": {"url": f"images/{im['file']}"}} for im in images])
    prompt = images[0]["prompt"] if images else c.data.validation_prompts[0]
    rows = "\n".join(f"| {k} | {v} |" for k, v in training_summary(run).items() if v is not None)
    link = f"[{base}](https://huggingface.co/{base})" if on_hub else "a local base model"
    tiny = ("\n\n**Test artifact**: trained on fluxnb's offline tiny model (random weights, a few layers) to check the "
            "pipeline end to end; it is not a usable style." if c.profile == "tiny" else "")
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731 - a "|" would end the table cell
    gallery_md = "\n".join(f"| ![{cell(im['prompt'])}](images/{im['file']}) | {cell(im['prompt'])} (seed {im['seed']}, "
                           f"{im['steps']} steps, LoRA scale {im['lora_scale']}) |" for im in images)
    return f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A LoRA for {link} trained with [fluxnb](https://github.com/fluxnb/fluxnb): the QLoRA recipe of the Hugging Face
blog post "(LoRA) Fine-Tuning FLUX.1-dev on Consumer Hardware" ({c.model.quantization} base, rank-{c.lora.rank} LoRA on
the {c.lora.targets} layers, {c.train.optimizer}, cached latents and text embeddings).{tiny}

## Trigger word

{f"Put `{trigger}` in your prompt." if trigger else "No trigger word: the style applies to any prompt."}

## Use it with diffusers

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{base if on_hub else 'path/to/base-model'}", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("{repo_id}", weight_name="{LORA_FILE}")
pipe.enable_model_cpu_offload()
image = pipe({prompt!r}, num_inference_steps=28, guidance_scale=3.5,
             width={c.data.width}, height={c.data.height}, generator=torch.manual_seed(0)).images[0]
```

## ComfyUI, Forge, kohya

`{comfy_file}` holds the same LoRA in kohya's layout with FLUX's own layer names (`lora_unet_double_blocks_0_img_attn_qkv`,
...): put it in `ComfyUI/models/loras/` and load it with a LoraLoader node.

## Samples
{"" if images else chr(10) + "(none yet: run notebook 04 to make a gallery)"}
{"| image | prompt |" + chr(10) + "|---|---|" + chr(10) + gallery_md if images else ""}

## Training

| setting | value |
|---|---|
{rows}

## License

A LoRA is a derivative of its base model: its use follows the base model's licence
({f"[{license_name}]({license_link})" if license_link else license_}).
"""


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
    for im in images:
        _copy(run.dir.gallery / im["file"], folder / "images" / im["file"])
    if run.dir.comparison.is_file():
        _copy(run.dir.comparison, folder / "images" / run.dir.comparison.name)
    if not images:
        notes.append("no sample images yet: run notebook 04 to add a gallery to the card")
    card = card_text(run, settings, comfy, images)
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
        return ("not logged in: run `from huggingface_hub import notebook_login; notebook_login()` (or "
                "`hf auth login`, or set HF_TOKEN) with a token that has write access")
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
                              card_text(run, settings, staged.comfy_file, staged.images, repo.repo_id))
        api.upload_folder(repo_id=repo.repo_id, folder_path=staged.folder, repo_type="model",
                          commit_message=settings.commit_message)
    except Exception as err:  # network down, no write access, name taken: nothing published, say why
        return PushResult(False, f"upload failed, no files were published: {scrub(f'{type(err).__name__}: {err}')}")
    url = f"https://huggingface.co/{repo.repo_id}"
    return PushResult(True, f"uploaded {len(staged.files)} files to {url} ({'private' if settings.private else 'public'})", url)
