"""The model card of a shared LoRA: YAML header (base model, licence, tags, widget gallery) and a body that says
how to use it and how it was made.

    text = card_text(run, trigger, "mucha_comfyui.safetensors", images, repo_id="me/mucha-flux-lora")

Everything a user typed (trigger word, prompts, repo name) is written as text, never as markup: HTML is escaped,
Markdown's special characters are backslashed, line breaks become spaces, and code spans and blocks get fences
longer than any backticks inside, so a prompt cannot add a heading, a link, a script or an image to the page.
The YAML header may still hold "---" inside a prompt (a long one wraps onto its own lines): split the card the
way the Hub does, `huggingface_hub.ModelCard(text)` (.data, .text), never at the first "---".
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from ..config import BASES
from ..data.store import read_samples
from ..infer.export import left_out, read_lora
from ..model.lora import NAMES, file_type
from ..run import LORA_FILE, Run
from ..run.records import MetricsLog, read_gallery_index

LICENSES = {  # base model -> (license, license_name, license_link): a LoRA inherits its base model's terms
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license",
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-Krea-dev": ("other", "flux-1-dev-non-commercial-license",
                                          "https://huggingface.co/black-forest-labs/FLUX.1-Krea-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-Kontext-dev": ("other", "flux-1-dev-non-commercial-license",
                                             "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
}
TAGS = ["text-to-image", "diffusers", "lora", "flux", "flux-diffusers", "template:sd-lora", "qlora", "fluxnb"]


def trigger_word(run: Run) -> str | None:
    """The instance prompt if one was set, else the last phrase shared by every caption and validation prompt."""
    data = run.config.data
    if data.instance_prompt.strip():
        return data.instance_prompt.strip()
    texts = list(data.validation_prompts)
    if run.dir.samples_file.is_file():
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
    return {"base model": _public_name(c.model.model_id), "base": c.model.base, "dataset": _public_name(c.data.dataset),
            "resolution": f"{c.data.width}x{c.data.height}", "quantization": c.model.quantization,
            "adapter": c.lora.type if c.lora.type != "lora" else None,  # DoRA, LoKr (a plain LoRA: no row)
            "LoRA rank": c.lora.rank, "LoRA alpha": c.lora.alpha, "LoRA targets": c.lora.targets,
            "EMA decay (the weights shared)": c.train.ema_decay or None,
            "optimizer": c.train.optimizer, "learning rate": c.train.learning_rate, "lr scheduler": c.train.lr_scheduler,
            "batch size": c.train.batch_size, "gradient accumulation": c.train.gradient_accumulation_steps,
            "optimizer steps (planned)": c.train.max_train_steps, "optimizer steps (done)": steps,
            "weighting scheme": c.train.weighting_scheme,
            "sigmoid scale": c.train.sigmoid_scale if c.train.weighting_scheme == "flux_shift" else None,
            "caption dropout": c.train.caption_dropout, "guidance scale (training)": c.train.guidance_scale,
            "gradient checkpointing": c.train.gradient_checkpointing, "seed": c.train.seed}


def gallery(run: Run) -> list[dict]:
    """Notebook 04's LoRA images with their prompts ([] when notebook 04 has not been run)."""
    return read_gallery_index(run.dir.gallery)


_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")  # what starts emphasis, code, a link or image, a cell, a strike


def text(value: object) -> str:
    """`value` as plain text in Markdown (a table cell, a heading, a sentence): one line, no markup."""
    one_line = " ".join(str(value).split())
    return _MARKDOWN.sub(r"\\\1", html.escape(one_line, quote=True))


def code(value: str) -> str:
    """`value` as an inline code span, its fence longer than any run of backticks inside (shown verbatim)."""
    one_line = " ".join(value.split())
    fence = "`" * (max((len(r) for r in re.findall(r"`+", one_line)), default=0) + 1)
    return f"{fence} {one_line} {fence}"


def _fence(body: str) -> str:
    return "`" * max(3, max((len(r) + 1 for r in re.findall(r"`+", body)), default=0))


def card_text(run: Run, trigger: str, comfy_file: str, images: list[dict], repo_id: str) -> str:
    """The model card (README.md of the Hub repo); `trigger`: the word to put in prompts ("" = found from the
    run's captions, trigger_word)."""
    from huggingface_hub import ModelCardData

    c, base = run.config, _public_name(run.config.model.model_id)
    license_, license_name, license_link = LICENSES.get(c.model.model_id, ("other", None, None))
    # One line, like every prompt in the header: a line break in the instance prompt or a caption ("\n---\n")
    # would otherwise reach the YAML. Read the card back with huggingface_hub's ModelCard (notebook 05 does).
    trigger = " ".join(trigger.split()) or " ".join((trigger_word(run) or "").split())
    on_hub = base != "a local folder"
    data = ModelCardData(
        base_model=base if on_hub else None, license=license_, license_name=license_name,
        license_link=license_link, library_name="diffusers", pipeline_tag=task(run), tags=[task(run), *TAGS[1:]],
        instance_prompt=trigger or None, widget=[{"text": " ".join(im["prompt"].split()), "output": {"url": f"images/{im['file']}"}}
                                         for im in images])
    link = f"[{text(base)}](https://huggingface.co/{base})" if on_hub else "a local base model"
    if base != BASES[c.model.base] and c.profile != "tiny":  # a local copy, a mirror: say which FLUX.1 it holds
        link += f" ({text(c.model.base)})"
    lora = run.dir.lora_file
    plain = not lora.is_file() or file_type(lora) == "lora"
    dropped = left_out(read_lora(lora)) if lora.is_file() and plain else []
    tiny = ("\n\n**Test artifact**: trained on fluxnb's offline tiny model (random weights, a few layers) to check the "
            "pipeline end to end; it is not a usable style." if c.profile == "tiny" else "")
    body = "\n\n".join([
        f"# {text(repo_id.split('/')[-1])}",
        f"A LoRA for {link} trained with [fluxnb](https://github.com/fluxnb/fluxnb): the QLoRA recipe of the Hugging "
        f"Face blog post \"(LoRA) Fine-Tuning FLUX.1-dev on Consumer Hardware\" ({text(c.model.quantization)} base, "
        f"rank-{c.lora.rank} LoRA on the {text(c.lora.targets)} layers, {text(c.train.optimizer)}, cached latents and "
        f"text embeddings).{tiny}",
        "## Trigger word",
        f"Put {code(trigger)} in your prompt." if trigger else "No trigger word: the style applies to any prompt.",
        "## Use it with diffusers", _usage(run, base if on_hub else "path/to/base-model", repo_id, images),
        "## ComfyUI, Forge, kohya",
        (f"{code(comfy_file)} holds the same LoRA in kohya's layout with FLUX's own layer names "
         "(`lora_unet_double_blocks_0_img_attn_qkv`, ...)" if plain else
         f"{code(comfy_file)} holds the same {NAMES[c.lora.type]} in LyCORIS's layout with diffusers' layer names "
         "(`lycoris_transformer_blocks_0_attn_to_q`, ...)")
        + ": put it in `ComfyUI/models/loras/` and load it with a LoraLoader node." + (
            f" It leaves out the LoRA on FLUX's final layer ({', '.join(map(code, dropped))}): "
            f"kohya's layout has no slot there; {code(LORA_FILE)} has it." if dropped else ""),
        "## Samples", _gallery_table(images),
        "## Training", "| setting | value |\n|---|---|\n" + "\n".join(
            f"| {text(k)} | {text(v)} |" for k, v in training_summary(run).items() if v is not None),
        "## License",
        "A LoRA is a derivative of its base model: its use follows the base model's licence "
        f"({f'[{text(license_name)}]({license_link})' if license_link else text(license_)}).",
    ])
    return f"---\n{data.to_yaml()}\n---\n\n{body}\n"


def task(run: Run) -> str:
    """The Hub's pipeline tag: a Kontext LoRA edits images (an instruction + an input image), the others draw."""
    return "image-to-image" if run.config.model.kontext else "text-to-image"


def _usage(run: Run, base: str, repo_id: str, images: list[dict]) -> str:
    """The diffusers snippet; `base` and `repo_id` are Hub ids (validated: no quotes), the prompt a Python repr."""
    c = run.config
    prompt = " ".join((images[0]["prompt"] if images else c.data.validation_prompts[0]).split())
    load = (f'pipe.load_lora_weights("{repo_id}", weight_name="{LORA_FILE}")' if c.lora.type != "lokr" else
            f'pipe.transformer.load_lora_adapter("{repo_id}", weight_name="{LORA_FILE}", prefix="transformer")')
    kontext = c.model.kontext  # an edit of an input image, at the training size (Kontext's default: ~1 megapixel)
    pipeline = "FluxKontextPipeline" if kontext else "FluxPipeline"
    size = (f'image=load_image("your-image.png"), max_area={c.data.width} * {c.data.height},' if kontext else
            f"width={c.data.width}, height={c.data.height},")
    code_ = f"""import torch
from diffusers import {pipeline}{chr(10) + "from diffusers.utils import load_image" if kontext else ""}

pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.bfloat16)
{load}
pipe.enable_model_cpu_offload()
image = pipe({prompt!r}, num_inference_steps=28, guidance_scale=3.5,
             {size} generator=torch.manual_seed(0)).images[0]"""
    fence = _fence(code_)
    return f"{fence}python\n{code_}\n{fence}"


def _gallery_table(images: list[dict]) -> str:
    """One row per image; Kontext's rows (an "input" file each) show the edited image first."""
    if not images:
        return "(none yet: run notebook 04 to make a gallery)"
    edits = all("input" in im for im in images)
    rows = []
    for im in images:
        before = f"![input](images/{im['input']}) | " if edits else ""
        rows.append(f"| {before}![{text(im['prompt'])}](images/{im['file']}) | {text(im['prompt'])} (seed "
                    f"{im['seed']}, {im['steps']} steps, LoRA scale {im['lora_scale']}) |")
    head = "| input | result | instruction |\n|---|---|---|" if edits else "| image | prompt |\n|---|---|"
    return head + "\n" + "\n".join(rows)


def inline_images(markdown: str, folder: Path, width: int = 256) -> str:
    """`markdown` with each `](images/NN.png)` of `folder` (RUN/hub/) replaced by the image itself, a JPEG thumbnail
    `width` pixels wide as a data URI, for showing the card inside a notebook: a notebook's Markdown resolves
    relative links against the notebook's own folder (JupyterLab, HTML exports), not the card's. The uploaded
    README.md keeps the Hub's paths."""
    import base64
    import io

    from PIL import Image

    def thumbnail(match: re.Match) -> str:
        path = folder / "images" / match.group(1)
        if not path.is_file():
            return match.group(0)
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((width, width * 4))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
        return f"](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()})"

    return re.sub(r"\]\(images/([\w.-]+)\)", thumbnail, markdown)
