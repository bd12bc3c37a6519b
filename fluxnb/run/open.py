"""The run directory and the open run: every path of a run in one place, and how a notebook starts.

    run = fluxnb.open_run()        # every notebook's first cell

One folder that every notebook reads and writes, so each can be re-run alone, on a new VM, from Drive:

    runs/mucha/
      config.json                      the RunConfig (fluxnb.config)
      samples.jsonl                    one line per training sample: id, caption, source, bucket (fluxnb.data.store)
      embeddings/<caption_id>.safetensors   T5 + CLIP embeddings of one text (fluxnb.data.embeddings)
      latents/<sample_id>.safetensors  the VAE latent distribution of one sample (fluxnb.data.latents)
      checkpoints/step-N/              resumable training state (fluxnb.train.checkpoint)
      lora/pytorch_lora_weights.safetensors   the trained LoRA, stock diffusers format (fluxnb.model.lora)
      samples/                         sample grids, loss plot; notebook 04's base_vs_lora.png and final/ gallery
      metrics.jsonl                    one line per optimizer step (fluxnb.train.monitor)
      merged/  export/  hub/           notebook 04's merged model and exports, notebook 05's upload folder
      executed/                        the notebooks as `python -m fluxnb notebooks` ran them
      .lock                            held by the process writing the run now (fluxnb.lock)

The first `open_run` makes config.json with the defaults for this machine (the blog recipe on a GPU; the offline
tiny FLUX without one); later notebooks, maybe on a new Colab VM, load the same file and carry on.
Every step that writes holds the run's lock while it runs (`@writes("train")`), so two notebooks, or a notebook
and the CLI, never write one run at once; a process re-running its own steps never waits on itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

from .config import CONFIG_FILE, RunConfig
from .hardware import Hardware, detect, dtype_from_name
from .lock import hold, holder

RUN_DIR_ENV = "FLUXNB_RUN_DIR"
LORA_FILE = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors": what load_lora_weights(folder) looks for


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    config = property(lambda self: self.root / CONFIG_FILE)
    samples = property(lambda self: self.root / "samples.jsonl")
    embeddings = property(lambda self: self.root / "embeddings")
    latents = property(lambda self: self.root / "latents")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lora = property(lambda self: self.root / "lora")
    lora_file = property(lambda self: self.root / "lora" / LORA_FILE)
    images = property(lambda self: self.root / "samples")
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

    @property
    def name(self) -> str:
        return self.root.resolve().name


@dataclass
class Run:
    dir: RunDir
    config: RunConfig
    hw: Hardware

    @property
    def path(self) -> Path:
        return self.dir.root

    def save(self) -> Path:
        """Validate the (maybe widget-edited) config, make its local paths absolute, write it to config.json. A
        changed model.dtype (e.g. "fp16", what a T4 computes in) takes effect here, for the rest of this notebook too."""
        self.config = RunConfig.from_dict(self.config.to_dict()).with_local_paths_resolved()
        wanted = self.config.model.dtype
        if wanted != "auto" and dtype_from_name(wanted) != self.hw.dtype:
            self.hw = detect(self.hw.profile, wanted)
        with self.dir.writing("save the config"):
            return self.config.save(self.dir.root)


def writes(what: str) -> Callable:
    """Decorator for a step `fn(run: Run | RunDir, ...)` that writes the run: it holds the run's lock meanwhile."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def step(run, *args, **kwargs):
            with (run.dir if isinstance(run, Run) else run).writing(what):
                return fn(run, *args, **kwargs)
        return step
    return wrap


def default_run_dir(profile: str) -> Path:
    """$FLUXNB_RUN_DIR, else runs/<name> at the top of the fluxnb checkout (or the working directory)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    top = checkout if (checkout / "notebooks").is_dir() else Path.cwd()
    return top / "runs" / ("tiny" if profile == "tiny" else "mucha")


def default_config(hw: Hardware) -> RunConfig:
    """The blog recipe for a GPU; for the tiny profile, the same recipe pointed at the offline tiny FLUX."""
    if hw.profile != "tiny":
        from . import presets  # the blog recipe, adjusted to this GPU's memory (fluxnb.presets)

        return presets.apply(RunConfig(profile="real"), presets.pick(hw), hw)
    from .tiny import ensure_tiny
    from .tiny_captioner import ensure_tiny_captioner

    assets = ensure_tiny()
    return RunConfig(profile="tiny").replace(
        data={"dataset": str(assets.dataset), "width": 64, "height": 96,
              "validation_prompts": list(assets.validation_prompts), "captioner": str(ensure_tiny_captioner())},
        model={"model_id": str(assets.model)},
        # The tiny transformer is random and 32 wide: LoRA on its attention alone barely moves the loss, LoRA on
        # every linear layer at rank 16 does within 200 steps (~20 s on 2 cores). The blog's attention-only r4
        # recipe is the real profile's default.
        lora={"rank": 16, "alpha": 16.0, "targets": "all-linear"},
        train={"max_train_steps": 200, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
               "sample_every": 100, "checkpoint_every": 100, "sample_steps": 4},
    )


def open_run(run_dir: str | Path | None = None, *, profile: str | None = None, verbose: bool = True,
             create: bool = True) -> Run:
    """Detect hardware, then load `run_dir/config.json`, or create it with this machine's defaults.

    create=False: a new run's config is only in memory until `run.save()` (the CLI saves it once its step
    succeeded, so a failed first step leaves no config behind)."""
    from .memory import start_peak_log

    start_peak_log()  # only when FLUXNB_PEAKS_FILE is set (benchmarks/rehearsal.py)
    hw = detect(profile)
    run = RunDir(run_dir if run_dir is not None else default_run_dir(hw.profile))
    if run.config.is_file():
        config = RunConfig.load(run.root)
        if config.profile != hw.profile:
            hw = detect(config.profile, config.model.dtype)  # the run keeps the profile it was made with
        elif config.model.dtype != "auto":
            hw = detect(hw.profile, config.model.dtype)
    else:
        config = default_config(hw)
        if create:
            with run.writing("create the run"):
                config.save(run.root)
    if verbose:
        print(hw.describe())
        print(f"fluxnb: run directory {run.root}")
        busy = holder(run.lock)
        if busy:
            print(f"note: PID {busy.get('pid')} is writing this run now ({busy.get('step')!r}); steps that write "
                  "will refuse until it ends (reading is fine).")
    return Run(run, config, hw)
