"""Open a run: detect the hardware, pick the profile, load or create the run directory's config.

Every notebook starts with `run = fluxnb.open_run()`. The first call makes `runs/<name>/config.json` with the
defaults for this machine (the blog recipe on a GPU; the offline tiny FLUX without one); later notebooks,
maybe on a new Colab VM, load the same file and carry on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cache import RunDir
from .config import RunConfig
from .hardware import Hardware, detect

RUN_DIR_ENV = "FLUXNB_RUN_DIR"


@dataclass
class Run:
    dir: RunDir
    config: RunConfig
    hw: Hardware

    @property
    def path(self) -> Path:
        return self.dir.root

    def save(self) -> Path:
        """Validate the (maybe widget-edited) config and write it to config.json."""
        self.config = RunConfig.from_dict(self.config.to_dict())
        return self.config.save(self.dir.root)


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

        return presets.apply(RunConfig(profile="real"), presets.pick(hw))
    from .tiny import ensure_tiny

    assets = ensure_tiny()
    return RunConfig(profile="tiny").replace(
        data={"dataset": str(assets.dataset), "width": 64, "height": 96,
              "validation_prompts": list(assets.validation_prompts)},
        model={"model_id": str(assets.model)},
        # The tiny transformer is random and 32 wide: LoRA on its attention alone barely moves the loss (-18% in
        # 300 steps), LoRA on every linear layer at rank 16 cuts the fixed-noise training-set loss by ~35% in
        # 200 steps (~20 s on 2 cores). The blog's attention-only r4 recipe is the real profile's default.
        lora={"rank": 16, "alpha": 16.0, "targets": "all-linear"},
        train={"max_train_steps": 200, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
               "sample_every": 100, "checkpoint_every": 100, "sample_steps": 4},
    )


def open_run(run_dir: str | Path | None = None, *, profile: str | None = None, verbose: bool = True) -> Run:
    """Detect hardware, then load `run_dir/config.json`, or create it with this machine's defaults."""
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
        config.save(run.root)
    if verbose:
        print(hw.describe())
        print(f"fluxnb: run directory {run.root}")
    return Run(run, config, hw)
