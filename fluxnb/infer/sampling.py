"""Images from the trained LoRA with a stock diffusers FluxPipeline (the blog's "Option 1": load the adapter).

    pipe = load_pipeline(run)                     # base model, sized for this GPU (see plan_pipeline)
    load_lora(pipe, run.dir.lora / "pytorch_lora_weights.safetensors")   # adapter "lora"
    set_scale(pipe, 0.8)                          # how strongly the style applies (0 = base model)
    load_lora(pipe, other_file, "other")
    blend(pipe, {"lora": 0.7, "other": 0.3})      # several adapters mixed with set_adapters
    base, styled = base_vs_lora(pipe, prompts, settings, run)

Every image of a prompt starts from the same seeded noise (a CPU generator: the same on any GPU), so base and
LoRA columns differ only by the adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import torch
from PIL import Image

from ..base.errors import FluxnbError
from ..base.files import atomic_path
from ..base.hub_errors import hub_errors
from ..base.memory import GiB, free, trim_host_memory
from ..base.plots import image_grid, save_figure
from ..base.progress import Bar
from ..data import embeddings
from ..data.controls import validation_controls
from ..model.lora import adapter_type
from ..model.offload import stream_blocks, streamer_of, transformer_blocks
from ..model.quant import load_transformer
from ..run import Run
from ..run.records import write_gallery_index
from ..train.monitor import kontext_call

ADAPTER = "lora"


@dataclass
class SampleSettings:
    """What one generation uses; notebook 04 edits it with a widget form."""

    prompt: str = "a puppy in a pond, alphonse mucha style"
    lora_scale: float = 1.0  # 0 = base model, 1 = as trained, >1 exaggerates the style
    seed: int = 0
    steps: int = 28  # the blog's num_inference_steps
    guidance_scale: float = 3.5  # FLUX.1-dev's distilled guidance (an input of the model, not CFG)
    width: int = 512
    height: int = 768

    def __post_init__(self) -> None:
        checks = [(bool(self.prompt.strip()), "prompt is empty."),
                  (-4.0 <= self.lora_scale <= 4.0, f"lora_scale must be between -4 and 4, got {self.lora_scale!r}."),
                  (isinstance(self.steps, int) and 1 <= self.steps <= 200, f"steps must be 1..200, got {self.steps!r}."),
                  (self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale!r}."),
                  (isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}.")]
        checks += [(isinstance(v, int) and v > 0 and v % 16 == 0, f"{k}={v!r} must be a positive multiple of 16.")
                   for k, v in (("width", self.width), ("height", self.height))]
        for ok, message in checks:
            if not ok:
                raise FluxnbError(message)


def default_settings(run: Run) -> SampleSettings:
    """The run's resolution and first validation prompt; the blog's 28 steps, or the tiny profile's few."""
    data = run.config.data
    steps = 28 if run.hw.profile == "real" else run.config.train.sample_steps
    return SampleSettings(prompt=data.validation_prompts[0], steps=steps, width=data.width, height=data.height)


@dataclass(frozen=True)
class Plan:
    quantize: bool  # NF4 transformer (6.7 GB) instead of 16-bit (23.8 GB)
    offload: bool  # the transformer's blocks stream from CPU RAM (fluxnb.model.offload), two on the GPU at a time
    text_encoders: bool  # keep T5 + CLIP (9.7 GB in 16-bit) in the pipeline; else prompts come pre-encoded
    reason: str


def plan_pipeline(run: Run) -> Plan:
    """How FLUX.1-dev fits this machine for inference (sizes in 16-bit; NF4 transformer 6.7 GB):

    >= 40 GiB GPU (A100, H100): everything 16-bit on the GPU, 34 GB.  24 GiB (4090): NF4 transformer + 16-bit
    T5/CLIP/VAE, 17 GB, all resident.  Smaller (T4, 15 GiB, with 12.7 GB of system RAM, too little to park T5 next
    to the transformer): NF4 transformer and VAE only; prompts are encoded first (cached ones are reused) and the
    text encoders freed.  CPU (tiny profile): the full pipeline in fp32.
    """
    gpu = run.hw.gpu
    if run.hw.device.type != "cuda" or gpu is None:
        return Plan(False, False, True, "CPU: the whole pipeline in fp32")
    if gpu.total_gib >= 40 and run.config.model.prequantized is None:
        return Plan(False, False, True, f"{gpu.total_gib:.0f} GiB GPU: everything in {run.hw.dtype_name}, resident")
    if gpu.total_gib >= 22:
        return Plan(True, False, True, f"{gpu.total_gib:.0f} GiB GPU: NF4 transformer, text encoders resident")
    offload = gpu.total_gib < 12  # below that even NF4 + VAE + activations at 512x768 get tight: stream the blocks
    return Plan(True, offload, False, f"{gpu.total_gib:.0f} GiB GPU: NF4 transformer; prompts encoded separately"
                + (", its blocks streamed from CPU RAM" if offload else ""))


def load_pipeline(run: Run, plan: Plan | None = None, *, transformer=None):
    """A stock FluxPipeline (FluxKontextPipeline for Kontext) of the run's base model (or of `transformer`, e.g. a
    merged one), placed per `plan`. Both pipelines take the same components from the same folders."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    plan = plan or plan_pipeline(run)
    model = run.config.model
    if transformer is None:
        transformer = load_transformer(dataclasses.replace(model, quantization="nf4" if plan.quantize else "none"), run.hw)
    skip = {} if plan.text_encoders else dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    with hub_errors(model.model_id):
        pipeline = FluxKontextPipeline if model.kontext else FluxPipeline  # Kontext edits an input image
        pipe = pipeline.from_pretrained(model.model_id, revision=model.revision, transformer=transformer,
                                        dtype=run.hw.dtype, **skip)
    pipe.to(run.hw.device)
    if plan.offload and streamer_of(transformer) is None:
        # Training's block streaming, not diffusers' enable_model_cpu_offload, which moves the whole transformer
        # to the GPU and back on every call: with it the 8 GB card rehearsal's notebook 04 held 12.9 GiB of
        # anonymous RAM and was killed at its 14 GiB limit. Here the CPU copies are made once, in pinned RAM.
        stream_blocks(transformer, len(transformer_blocks(transformer)))
    trim_host_memory()  # what loading staged in CPU RAM
    pipe.set_progress_bar_config(leave=False)
    return pipe


def load_lora(pipe, path: str | Path, name: str = ADAPTER) -> str:
    """Load a diffusers (or kohya/ComfyUI) LoRA file as adapter `name`, active at scale 1.

    DoRA files load like LoRAs. A LoKr goes onto the transformer with diffusers' `load_lora_adapter` (the
    pipeline's load_lora_weights wants "lora" in every key); set_adapters, disable_lora and fuse_lora see it alike.
    It cannot run on an NF4 transformer (fluxnb.model.lora.nf4_problem): merge it there (fluxnb.infer.merge)."""
    path = Path(path)
    if not path.is_file():
        raise FluxnbError(f"{path} does not exist: train first (notebook 03), or pick another LoRA file.")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        lokr = adapter_type(f.keys()) == "lokr"
    if lokr and is_nf4(pipe.transformer):
        raise FluxnbError(f"{path.name} is a LoKr, which cannot run on this NF4 transformer: load the pipeline in 16-bit "
                          "(plan_pipeline's quantize=False, 24 GB of GPU memory for FLUX.1-dev), or merge it into the "
                          "base (merge.fuse_to_disk) and sample the merged model.")
    quiet = logging.getLogger("diffusers.loaders.lora_base")  # "no LoRA keys for the text encoder": by design
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # peft on a second adapter: "this will lead to multiple adapters" - yes
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if lokr:
                pipe.transformer.load_lora_adapter(str(path.parent), weight_name=path.name, adapter_name=name,
                                                   prefix="transformer")
            else:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    finally:
        quiet.setLevel(level)
    return name


def is_nf4(transformer) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())


def set_scale(pipe, scale: float, name: str = ADAPTER) -> None:
    """Only adapter `name`, at `scale` (each layer adds scale * alpha / r * B @ A x)."""
    pipe.set_adapters([name], [float(scale)])


def blend(pipe, weights: dict[str, float]) -> None:
    """Several loaded adapters at once, each with its own weight: delta W = sum_i w_i * dW_i."""
    missing = sorted(set(weights) - {n for names in pipe.get_list_adapters().values() for n in names})
    if missing:
        raise FluxnbError(f"adapters {missing} are not loaded; load them with load_lora(pipe, path, name) first.")
    pipe.set_adapters(list(weights), [float(w) for w in weights.values()])


# T5-XXL in 8-bit as notebook 01 loads it (its `wo` matrices stay 16-bit, fp32 under fp16) + CLIP, in GiB
T5_8BIT_GIB = {torch.bfloat16: 6.3, torch.float16: 8.3}


def encode_prompts(run: Run, prompts: list[str]) -> int:
    """Encode the prompts missing from the run's embedding cache with notebook 01's encoders, cache them, free the
    encoders; returns how many were encoded. On a small GPU (T4) call it BEFORE load_pipeline: T5 in 8-bit
    (8.3 GB on a T4) and the NF4 transformer (6.7 GB) do not fit in its 15 GB together."""
    todo = embeddings.missing(run, prompts)
    if not todo:
        return 0
    if run.hw.device.type == "cuda":
        have, need = torch.cuda.mem_get_info()[0] / GiB, T5_8BIT_GIB.get(run.hw.dtype, 10.0)
        if have < need:
            raise FluxnbError(
                f"{len(todo)} new prompt(s) need the text encoders ({need:.1f} GiB), but only {have:.1f} GiB of GPU "
                "memory is free next to the transformer. Free the pipeline (memory.free(pipe)), run "
                "sampling.encode_prompts(run, prompts), then load the pipeline again: the prompts stay cached.")
    text = embeddings.load_text_encoders(run.config.model, run.hw)
    embeddings.encode_and_save(run, text, todo, progress=False)
    free(text)
    return len(todo)


def edit_inputs(run: Run, prompts: list[str]) -> list[Image.Image] | None:
    """Kontext: the image each prompt edits, the run's validation controls (fluxnb.data.controls) cycled; None for
    a text-to-image base."""
    if not run.config.model.kontext:
        return None
    return list(islice(cycle(validation_controls(run)), len(prompts)))


def kontext_inputs(pipe, prompts: list[str], settings: SampleSettings, run: Run | None,
                   controls: list[Image.Image] | None) -> list[dict]:
    """Per prompt, what a FluxKontextPipeline call adds (as training's grids: fluxnb.train.monitor.kontext_call): the
    image to edit (`controls`, one per prompt; None = the run's, edit_inputs) at the settings' size. {} otherwise."""
    from diffusers import FluxKontextPipeline

    if not isinstance(pipe, FluxKontextPipeline):
        return [{} for _ in prompts]
    if controls is None and run is None:
        raise FluxnbError("a Kontext pipeline edits an image: pass controls=[one image per prompt], or run=.")
    controls = edit_inputs(run, prompts) if controls is None else controls
    if len(controls) != len(prompts):
        raise FluxnbError(f"{len(prompts)} prompt(s) but {len(controls)} control image(s): give one image per prompt.")
    return [kontext_call(c, settings.width, settings.height) for c in controls]


def generate(pipe, prompts: list[str], settings: SampleSettings, run: Run | None = None, *,
             output_type: str = "pil", label: str = "", controls: list[Image.Image] | None = None) -> list[Image.Image]:
    """One image per prompt, each from `settings.seed`: the same prompt and seed give the same noise anywhere.
    output_type="latent": the packed latents instead, (tokens, 64) each (fluxnb.infer.effect measures them).
    label: what the progress bar says is generating ("base model", "LoRA", ...). Kontext: the prompts are
    instructions, each edits its image of `controls` (kontext_inputs)."""
    edits = kontext_inputs(pipe, prompts, settings, run, controls)
    encoded = None
    if pipe.text_encoder is None:  # prompts come from the run's embedding cache (the T4 route, see plan_pipeline)
        if run is None:
            raise FluxnbError("this pipeline has no text encoders: pass run= so prompts can be encoded or read from cache.")
        encode_prompts(run, prompts)
        encoded = [embeddings.load_embedding(run.dir, p) for p in prompts]
    # One progress bar per call: over the denoising steps for one image, over the images for several (the
    # pipeline's own unlabelled per-image bar, "0/4" each time, is switched off then).
    many = len(prompts) > 1
    who = f"{label}: " if label else ""
    pipe.set_progress_bar_config(disable=many, desc=f"{who}1 image, {settings.steps} steps", leave=False)
    images = []
    for i, prompt in enumerate(Bar(prompts, desc=f"{who}{len(prompts)} images, {settings.steps} steps each",
                                   unit="image", disable=not many)):
        device = getattr(pipe, "_execution_device", pipe.device)  # the GPU, also with streamed blocks
        text = {"prompt": prompt} if encoded is None else {
            "prompt_embeds": encoded[i]["prompt_embeds"][None].to(device, run.hw.dtype),  # (1, L, D_t5)
            "pooled_prompt_embeds": encoded[i]["pooled_prompt_embeds"][None].to(device, run.hw.dtype)}  # (1, D_clip)
        out = pipe(**text, **edits[i], num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                   width=settings.width, height=settings.height,
                   generator=torch.Generator("cpu").manual_seed(settings.seed),
                   max_sequence_length=run.config.data.max_sequence_length if run else 512, output_type=output_type)
        images.append(out.images[0])
    trim_host_memory()  # RAM freed while generating (e.g. decoded images' buffers) goes back
    return images


def base_vs_lora(pipe, prompts: list[str], settings: SampleSettings, run: Run | None = None,
                 name: str = ADAPTER, controls: list[Image.Image] | None = None
                 ) -> tuple[list[Image.Image], list[Image.Image]]:
    """The same prompts and seed (and Kontext's control images) with the adapter off, then on at settings.lora_scale."""
    controls = edit_inputs(run, prompts) if controls is None and run is not None else controls  # read once for both
    pipe.disable_lora()
    base = generate(pipe, prompts, settings, run, label="base model", controls=controls)
    pipe.enable_lora()
    set_scale(pipe, settings.lora_scale, name)
    return base, generate(pipe, prompts, settings, run, label=f"LoRA at scale {settings.lora_scale:g}",
                          controls=controls)


def save_grid(path: Path, prompts: list[str], base: list[Image.Image], styled: list[Image.Image], *,
              labels: tuple[str, str] = ("base", "LoRA"), inputs: list[Image.Image] | None = None):
    """Top row base, bottom row LoRA, one column per prompt, saved as PNG; returns the matplotlib figure.
    `inputs` (Kontext, edit_inputs): the images the prompts edit, as a first row."""
    rows = [("input", inputs)] if inputs else []
    rows += [(labels[0], base), (labels[1], styled)]
    captions = [f"{label}: {p}" for label, _ in rows for p in prompts]
    fig = image_grid([im for _, images in rows for im in images], captions, ncols=len(prompts))
    save_figure(fig, path)
    return fig


def save_images(folder: Path, prompts: list[str], images: list[Image.Image], settings: SampleSettings,
                inputs: list[Image.Image] | None = None) -> Path:
    """folder/00.png, 01.png, ... and folder/prompts.json (file, prompt, seed, steps, scale): the model card's gallery.
    `inputs` (Kontext, edit_inputs): the image each prompt edited, as 00_input.png, ... beside its result."""
    rows = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        for name, picture in [(f"{i:02d}.png", image)] + ([(f"{i:02d}_input.png", inputs[i])] if inputs else []):
            with atomic_path(folder / name) as tmp:
                picture.save(tmp, format="PNG")
        rows.append({"file": f"{i:02d}.png", "prompt": prompt, "seed": settings.seed, "steps": settings.steps,
                     "lora_scale": settings.lora_scale, "guidance_scale": settings.guidance_scale,
                     **({"input": f"{i:02d}_input.png"} if inputs else {})})
    write_gallery_index(folder, rows)
    return folder
