"""RunDir: every path of a run directory in one place.

One folder that every notebook reads and writes, so each can be re-run alone, on a new VM, from Drive:

    runs/mucha/
      config.json                      the RunConfig (fluxnb.config)
      samples.jsonl                    one line per training sample: id, caption, source, bucket (fluxnb.data.store)
      embeddings/<caption_id>.safetensors   T5 + CLIP embeddings of one text (fluxnb.data.embeddings)
      latents/<sample_id>.safetensors  the VAE latent distribution of one sample (fluxnb.data.latents)
      checkpoints/step-N/              resumable training state (fluxnb.train.checkpoint)
      lora/pytorch_lora_weights.safetensors   the trained LoRA, stock diffusers format (fluxnb.model.lora)
      samples/                         sample grids, loss plot; notebook 04's base_vs_lora.png and final/ gallery
      metrics.jsonl                    one line per optimizer step (fluxnb.run.records)
      merged/  export/  hub/           notebook 04's merged model and exports, notebook 05's upload folder
      executed/                        the notebooks as `python -m fluxnb notebooks` ran them
      .lock                            held by the process writing the run now (fluxnb.run.lock)
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

from ..config import CONFIG_FILE
from .lock import hold
from .records import GALLERY_INDEX

RUN_DIR_ENV = "FLUXNB_RUN_DIR"
SAMPLES_FILE = "samples.jsonl"  # one line per training sample; its owner is fluxnb.data.store
LORA_FILE = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors": what load_lora_weights(folder) looks for
_GRID = re.compile(r"step-\d+\.png")  # samples/step-000100.png: training's sample grids
_GALLERY = re.compile(r"\d+\.png|" + re.escape(GALLERY_INDEX))  # samples/final/00.png ..., prompts.json


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    config = property(lambda self: self.root / CONFIG_FILE)
    samples_file = property(lambda self: self.root / SAMPLES_FILE)  # samples.jsonl (not the samples/ images)
    embeddings = property(lambda self: self.root / "embeddings")
    latents = property(lambda self: self.root / "latents")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lora = property(lambda self: self.root / "lora")
    lora_file = property(lambda self: self.root / "lora" / LORA_FILE)
    images = property(lambda self: self.root / "samples")
    loss_plot = property(lambda self: self.root / "samples" / "loss.png")  # training's loss curve
    comparison = property(lambda self: self.root / "samples" / "base_vs_lora.png")  # notebook 04's grid
    gallery = property(lambda self: self.root / "samples" / "final")  # notebook 04's images + prompts.json
    metrics = property(lambda self: self.root / "metrics.jsonl")
    merged = property(lambda self: self.root / "merged")
    export = property(lambda self: self.root / "export")
    hub = property(lambda self: self.root / "hub")
    executed = property(lambda self: self.root / "executed")
    lock = property(lambda self: self.root / ".lock")

    def writing(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Hold this run's lock while `what` ("train", "embed", ...) writes; RunBusy if another process does."""
        return hold(self.lock, what)

    def grid(self, step: int) -> Path:
        """samples/step-000100.png: the sample grid made at an optimizer step."""
        return self.images / f"step-{step:06d}.png"

    def own_images(self) -> list[Path]:
        """The files fluxnb wrote in samples/ (grids, loss plot, notebook 04's comparison and gallery), by their
        names: a file the user put there is never among them."""
        found = [p for p in self.images.glob("step-*.png") if _GRID.fullmatch(p.name)]
        found += [p for p in self.gallery.glob("*") if _GALLERY.fullmatch(p.name)]
        return sorted(p for p in [*found, self.loss_plot, self.comparison] if p.is_file())

    @property
    def name(self) -> str:
        return self.root.resolve().name


def default_run_dir(profile: str) -> Path:
    """$FLUXNB_RUN_DIR, else runs/<name> at the top of the fluxnb checkout (or the working directory)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    top = checkout if (checkout / "notebooks").is_dir() else Path.cwd()
    return top / "runs" / ("tiny" if profile == "tiny" else "mucha")
