"""What you watch while training: a progress bar with ETA, a live loss plot, sample grids (metrics.jsonl, which
the loop appends to, is fluxnb.run.records').

In a notebook the loss plot redraws in place every few seconds and each sample grid appears under the cell;
headless (`python -m fluxnb train`) the same figures are written to RUN/samples/ (loss.png, step-000100.png).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..base.plots import image_grid, loss_plot, save_figure
from ..base.progress import Bar
from ..data.buckets import fit_to_bucket, to_rgb
from ..data.embeddings import load_prompts
from ..run import RunDir


def in_notebook() -> bool:
    """True inside a Jupyter/Colab kernel (where figures can be shown and updated), False in a terminal."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class Progress:
    """tqdm bar (with ETA) + loss plot: redrawn in place in a notebook, saved as RUN/samples/loss.png at the end."""

    def __init__(self, run: RunDir, total: int, initial: int, history: list[dict[str, Any]], live: bool,
                 redraw_seconds: float = 3.0) -> None:
        self.run, self.live, self.redraw_seconds = run, live, redraw_seconds
        self.steps = [r["step"] for r in history]
        self.losses = [r["loss"] for r in history]
        self.val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]  # (step, held-out loss)
        self.bar = Bar(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)
        self._handle, self._last_draw = None, 0.0

    def update(self, row: dict[str, Any]) -> None:
        self.steps.append(row["step"])
        self.losses.append(row["loss"])
        if "val_loss" in row:
            self.val.append((row["step"], row["val_loss"]))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if self.live and time.monotonic() - self._last_draw > self.redraw_seconds:
            self._draw()

    def _figure(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3))  # not pyplot's: it must not pop up again at the end of the cell
        loss_plot(self.steps, self.losses, ax=fig.add_subplot(), val_steps=[s for s, _ in self.val],
                  val_losses=[v for _, v in self.val])
        return fig

    def _draw(self) -> None:
        import io

        from IPython.display import Image, display

        if len(self.steps) < 2:
            return
        buf = io.BytesIO()
        self._figure().savefig(buf, format="png", dpi=80)
        image = Image(data=buf.getvalue())  # a PNG shows in every frontend, whatever matplotlib backend is set
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)
        self._last_draw = time.monotonic()

    def close(self) -> Path | None:
        """Close the bar, save loss.png. The plot is cosmetic: failing to draw or write it (a full disk) only
        warns, so it can never stop the run before its LoRA is saved."""
        self.bar.close()
        if len(self.steps) < 2:
            return None
        try:
            if self.live:
                self._draw()
            return save_figure(self._figure(), self.run.loss_plot)
        except Exception as err:  # noqa: BLE001 - anything: metrics.jsonl holds the same numbers
            print(f"warning: the loss plot was not saved ({err}); metrics.jsonl has every step's loss.")
            return None


def kontext_call(control, width: int, height: int) -> dict:
    """What a FluxKontextPipeline call adds to edit `control` (a PIL image) at exactly width x height, as training
    saw its pairs: the control fitted to that size (fluxnb.data.buckets.fit_to_bucket: scaled to
    cover, center crop), and
    max_area = width * height with the pipeline's resizing to Kontext's ~1 MP sizes off."""
    size, rgb = (width, height), to_rgb(control)  # the pipeline's processor takes RGB, as the VAE saw the pairs
    return {"image": rgb if rgb.size == size else fit_to_bucket(rgb, size),
            "max_area": width * height, "_auto_resize": False}


class ValidationSampler:
    """Fixed-seed images of the validation prompts, from their CACHED embeddings: no text encoder is loaded.

    The VAE (168 MB in bf16) waits on the CPU and visits the GPU only to decode, so it costs no GPU memory while
    training. The transformer is the one being trained (NF4 + LoRA), switched to eval mode for the grid.

    With `controls` (FLUX.1-Kontext-dev: one input image per prompt, already width x height) each prompt edits its
    control through FluxKontextPipeline, at width x height exactly (max_area = width * height, no auto-resize to
    Kontext's ~1 MP sizes), and the grid shows each control beside its result.
    """

    def __init__(self, run: RunDir, prompts: list[str], scheduler, vae, hw, width: int, height: int,
                 steps: int, guidance_scale: float = 3.5, seed: int = 0, controls: list | None = None) -> None:
        self.run, self.prompts, self.scheduler, self.vae, self.hw = run, prompts, scheduler, vae, hw
        self.size, self.steps, self.guidance_scale, self.seed = (width, height), steps, guidance_scale, seed
        self.controls = controls
        self.prompt_embeds, self.pooled = load_prompts(run, prompts)  # (P, L, 4096), (P, 768)

    def _pipeline(self, transformer):
        """FluxPipeline, or FluxKontextPipeline with controls: the same components either way."""
        from diffusers import FluxKontextPipeline, FluxPipeline

        cls = FluxPipeline if self.controls is None else FluxKontextPipeline
        pipe = cls(scheduler=self.scheduler, vae=self.vae.to(self.hw.device), text_encoder=None, tokenizer=None,
                   text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _control(self, i: int) -> dict:
        """The Kontext pipeline's arguments for prompt i (kontext_call); {} without controls."""
        return {} if self.controls is None else kontext_call(self.controls[i], *self.size)

    @torch.no_grad()
    def images(self, transformer) -> list:
        device, dtype = self.hw.device, self.hw.dtype
        pipe = self._pipeline(transformer)
        was_training = transformer.training
        transformer.eval()
        # Autocast as in training: the LoRA weights are fp32, so without it the transformer returns fp32
        # latents that the bf16/fp16 VAE cannot decode.
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        try:
            with autocast:
                images = [pipe(prompt_embeds=self.prompt_embeds[i : i + 1].to(device, dtype),
                               pooled_prompt_embeds=self.pooled[i : i + 1].to(device, dtype),
                               width=self.size[0], height=self.size[1], num_inference_steps=self.steps,
                               guidance_scale=self.guidance_scale,
                               generator=torch.Generator("cpu").manual_seed(self.seed + i),
                               **self._control(i)).images[0]
                          for i in range(len(self.prompts))]
        finally:
            transformer.train(was_training)
            self.vae.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return images

    def grid(self, transformer, step: int, live: bool) -> Path:
        """Sample, save RUN/samples/step-000100.png, show it in a notebook."""
        import matplotlib.pyplot as plt

        images, captions = self.images(transformer), self.prompts
        if self.controls is not None:  # Kontext: each control, then what the prompt made of it
            images = [im for pair in zip(self.controls, images) for im in pair]
            captions = [text for prompt in self.prompts for text in ("input", prompt)]
        fig = image_grid(images, captions, ncols=4 if len(self.prompts) > 1 else 2, title=f"step {step}")
        path = save_figure(fig, self.run.grid(step))
        plt.close(fig)
        if live:
            from IPython.display import Image, display

            display(Image(filename=str(path)))
        return path
