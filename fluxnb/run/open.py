"""The open run: how every notebook starts, and the lock each writing step holds.

    run = open_run()        # every notebook's first cell: the machine (fluxnb.run.hardware), the run directory
                            # (fluxnb.run.dir), its config.json (fluxnb.config)

The first `open_run` makes config.json with the defaults (the blog recipe for FLUX.1-dev; the offline tiny FLUX
without a GPU); later notebooks, maybe on a new Colab VM, load the same file and carry on. The memory plan for the
GPU (a hardware preset, fluxnb.train.presets) is made where training is set up: notebook 03's form, the CLI's
`train`. Every step that writes holds the run's lock while it runs (`@writes("train")`), so two notebooks, or a
notebook and the CLI, never write one run at once; a process re-running its own steps never waits on itself.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import FluxnbError
from ..config import RunConfig
from .dir import RunDir, default_run_dir
from .hardware import Hardware, detect, dtype_from_name
from .lock import holder


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
        self.config = tiny_data_for_base(RunConfig.from_dict(self.config.to_dict()).with_local_paths_resolved())
        wanted = self.config.model.dtype
        if wanted != "auto" and dtype_from_name(wanted) != self.hw.dtype:
            self.hw = detect(self.hw.profile, wanted)
        with self.writing("save the config"):
            return self.config.save(self.dir.root)

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """RunDir.writing (the run's lock), once the run directory is known to be apart from the dataset."""
        check_apart(self.dir.root, self.config)
        with self.dir.writing(what):
            yield


def check_apart(root: Path, config: RunConfig) -> None:
    """A run directory never is, holds, or sits inside the local dataset folder: fluxnb writes (and --overwrite
    deletes) its own files there, which must never meet the user's images."""
    data = Path(config.data.dataset).expanduser()
    if not config.data.dataset or not data.is_dir():
        return  # a Hub id (or a form's empty field, which the config's own check refuses: not the working directory)
    run, data = Path(root).expanduser().resolve(), data.resolve()
    how = ("is the dataset folder" if run == data else "is inside the dataset folder" if run.is_relative_to(data)
           else "holds the dataset folder" if data.is_relative_to(run) else None)
    if how:
        raise FluxnbError(f"the run directory {run} {how} {data}: fluxnb writes and deletes its own files in a run "
                          "directory, so it must be apart from your images. Choose a run directory outside the "
                          "dataset folder and not around it (--run-dir, FLUXNB_RUN_DIR, open_run(path)).")


def writes(what: str) -> Callable:
    """Decorator for a step `fn(run: Run | RunDir, ...)` that writes the run: it holds the run's lock meanwhile
    (Run.writing: after checking that the run directory is apart from the dataset)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def step(run, *args, **kwargs):
            with run.writing(what):
                return fn(run, *args, **kwargs)
        return step
    return wrap


def default_config(hw: Hardware) -> RunConfig:
    """The blog recipe for FLUX.1-dev; for the tiny profile, the same recipe pointed at the offline tiny FLUX."""
    if hw.profile != "tiny":
        return RunConfig(profile="real")
    from ..tiny.captioner import ensure_tiny_captioner
    from ..tiny.flux import ensure_tiny

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


def tiny_data_for_base(config: RunConfig) -> RunConfig:
    """On the tiny profile, the tiny dataset of the run's base: FLUX.1-Kontext-dev trains on the generated pairs
    (fluxnb.tiny.pairs), the other bases on the drawings. Only a dataset (and validation prompts) still at the other
    tiny default moves: a dataset the user chose stays. The tiny model serves both (FluxKontextPipeline loads it)."""
    if config.profile != "tiny":
        return config
    from ..tiny import pairs
    from ..tiny.dataset import VALIDATION_PROMPTS
    from ..tiny.flux import ensure_tiny, tiny_root

    drawings, paired = (tiny_root() / "dataset", VALIDATION_PROMPTS), (pairs.pairs_root(), pairs.VALIDATION_PROMPTS)
    have, want = (drawings, paired) if config.model.kontext else (paired, drawings)
    if Path(config.data.dataset).expanduser().resolve() != have[0]:
        return config
    (pairs.ensure_tiny_pairs if config.model.kontext else ensure_tiny)()  # what it moves to, built if missing
    prompts = {"validation_prompts": list(want[1])} if config.data.validation_prompts == list(have[1]) else {}
    return config.replace(data={"dataset": str(want[0])} | prompts)


def open_run(run_dir: str | Path | None = None, *, profile: str | None = None, verbose: bool = True,
             create: bool = True) -> Run:
    """Detect hardware, then load `run_dir/config.json`, or create it with this machine's defaults.

    create=False: a new run's config is only in memory until `run.save()` (the CLI saves it once its step
    succeeded, so a failed first step leaves no config behind)."""
    from ..base.memory import start_peak_log

    start_peak_log()  # only when FLUXNB_PEAKS_FILE is set (benchmarks/rehearsal.py)
    hw = detect(profile)
    run = RunDir(run_dir if run_dir is not None else default_run_dir(hw.profile))
    if run.config.is_file():
        config = tiny_data_for_base(RunConfig.load(run.root))  # a base changed by hand takes its tiny dataset
        if config.profile != hw.profile:
            hw = detect(config.profile, config.model.dtype)  # the run keeps the profile it was made with
        elif config.model.dtype != "auto":
            hw = detect(hw.profile, config.model.dtype)
    else:
        config = default_config(hw)
        if create:
            check_apart(run.root, config)
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


# What a folder without config.json still needs before each command can run there (the steps make config.json).
_MISSING_STEPS = {
    "train": "notebooks 01 and 02 have not run there: cache the text embeddings and latents first "
             "(`python -m fluxnb embed --run-dir {root} --model MODEL --dataset DATASET`, then "
             "`python -m fluxnb latents --run-dir {root}`), or pass the --run-dir they were made in",
    "trained": "no run was trained there: run notebooks 01-03 first (embed, latents, train), or pass the --run-dir "
               "of a trained run",
}


def open_existing_run(run_dir: Path | None, needs: str = "trained") -> Run:
    """open_run on a run directory that earlier steps made (never creates a fresh one: the CLI's later steps);
    `needs` names what is missing ("train": notebooks 01-02, "trained": 01-03)."""
    root = run_dir or default_run_dir(detect().profile)
    if not RunDir(root).config.is_file():
        raise FluxnbError(f"{root} is not a run directory yet (no config.json): "
                          + _MISSING_STEPS[needs].format(root=root) + ".")
    return open_run(root)
