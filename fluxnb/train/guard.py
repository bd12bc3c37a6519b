"""Never lose a run: what `train` checks before it touches anything, and how it stops.

    guard.check_inputs(run, samples)                 # caches complete and made with today's settings
    start = guard.start_point(run, resume, overwrite)   # refuses to clobber an earlier run; deletes nothing
    guard.check_resumable(run, start, samples)       # same LoRA, model, optimizer and training set
    ...                                              # everything else that can fail: model, LoRA targets
    guard.clear_previous(run)                        # --overwrite: last, saying what it removes; never after a Ctrl-C

A checkpoint records the fingerprint of the training set it was trained on (`data_fingerprint`): the ordered
sample ids (image bytes + caption), caption ids and the caches' settings. Resuming on anything else would not
continue that run, so it is refused. A Ctrl-C is never lost (fluxnb.base.interrupts): one pressed at any moment
before `clear_previous`, even one a __del__ swallowed, stops it before it deletes anything.
"""

from __future__ import annotations

import contextlib
import shutil

from ..base.errors import FluxnbError
from ..base.interrupts import check_interrupted
from ..data import embeddings, latents
from ..data.store import Sample, fingerprint
from ..model.lora import nf4_problem
from ..run import Run
from . import checkpoint

RESUME_IN_PYTHON = "train(run, resume=True)"


def check_inputs(run: Run, samples: list[Sample]) -> None:
    """The adapter can train on this base, and the caches training reads (`samples`: samples.jsonl) are complete
    and made with the config's settings. Their contents (NaN, unreadable) are checked when training loads them
    (fluxnb.train.batches.CachedDataset)."""
    if problem := nf4_problem(run.config.lora, run.config.model.quantization):  # before loading any model
        raise FluxnbError(problem)
    cached, now = latents.cached_size(run.dir), (run.config.data.width, run.config.data.height)
    if cached is not None and cached != now:
        raise FluxnbError(f"the latents in {run.dir.latents} were cached at {cached[0]}x{cached[1]}, but the config "
                          f"now says {now[0]}x{now[1]}: put the resolution back, or re-run notebook 02 "
                          "(python -m fluxnb latents --overwrite) at the new size.")
    bad = latents.stale(run, samples)  # meta.json alone is not enough: a stopped `latents --overwrite` leaves a mix
    if bad:
        raise FluxnbError(f"{len(bad)} of {len(samples)} samples have no latent made with this run's settings "
                          f"(first: {bad[0].source}): notebook 02 did not finish (e.g. a `latents --overwrite` was "
                          "stopped), or the image settings changed since. Run notebook 02 (`python -m fluxnb latents "
                          f"--run-dir {run.dir.root}`) again to finish it; training never mixes them.")
    dropout = run.config.train.caption_dropout
    if dropout > 0 and not embeddings.is_current(run, embeddings.EMPTY_PROMPT):
        raise FluxnbError(f"train.caption_dropout={dropout:g} trains on the empty prompt, which has no embedding made "
                          f"with this run's settings (runs embedded before fluxnb cached it): re-run notebook 01 "
                          f"(`python -m fluxnb embed --run-dir {run.dir.root}`), which encodes just that, or set "
                          "caption_dropout to 0.")
    texts = embeddings.stale(run, samples)
    if texts:
        raise FluxnbError(f"{len(texts)} caption(s) have no embedding made with this run's settings (first: "
                          f"{texts[0][:60]!r}): re-run notebook 01 (`python -m fluxnb embed --run-dir "
                          f"{run.dir.root}`), then notebook 02.")


def data_fingerprint(run: Run, samples: list[Sample]) -> dict[str, object]:
    """What a checkpoint was trained on: {"data": hash of the ordered (sample id, caption id) pairs and the caches'
    settings, "samples": how many}. Editing a caption, adding or removing an image, or re-caching changes it."""
    rows = [(s.id, s.caption_id) for s in samples]
    settings = {"samples": rows, "latents": latents.settings(run.config), "embeddings": embeddings.settings(run.config)}
    return {"data": fingerprint(settings), "samples": len(rows)}


def start_point(run: Run, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume from (or None), after refusing to silently clobber an earlier run. Deletes nothing.

    A resume takes the newest checkpoint that verifies (fluxnb.train.checkpoint.verify). Damaged newer ones are
    named in one line, with what is wrong, and set aside by the session (renamed, never deleted): going back to an
    older checkpoint costs only the steps since, which training redoes, while refusing would leave a notebook user
    stuck before a folder they must repair by hand."""
    finished = run.dir.lora_file.is_file()
    if overwrite:
        return None
    if not resume:
        previous = checkpoint.latest(run.dir)
        if previous is not None or finished:
            done = f"up to step {previous.step}" if previous else "a finished LoRA"
            raise FluxnbError(f"{run.dir.root} already holds a training run ({done}): resume it (resume=True / "
                              "--resume) or start over (overwrite=True / --overwrite, which deletes its checkpoints, "
                              "samples and LoRA).")
        return None
    previous, damaged = checkpoint.newest_intact(run.dir)
    what = ", ".join(f"{c.path.name} ({why})" for c, why in damaged)
    if damaged and previous is None:
        raise FluxnbError(f"no checkpoint in {run.dir.checkpoints} can be resumed, all are damaged: {what}. Start "
                          "over with overwrite=True (--overwrite, which deletes them, the samples and the LoRA), or "
                          "train in a new run directory.")
    if damaged:
        kept = ", ".join(checkpoint.aside_name(c.path).name for c, _ in damaged)
        print(f"fluxnb: damaged checkpoint {what}: resuming from {previous.path.name}, the newest intact one in "
              f"{run.dir.checkpoints}; kept on disk, renamed {kept}.")
    if previous is None and finished:
        raise FluxnbError(f"{run.dir.root} holds a finished LoRA but no checkpoint to resume from: training again "
                          "would start at step 0 and replace it. Start over on purpose (overwrite=True / "
                          "--overwrite), or train in another run directory.")
    if previous is None:  # nothing to resume (e.g. stopped before the first checkpoint): say it, start over
        print(f"fluxnb: no checkpoint in {run.dir.checkpoints} to resume from: training starts at step 0.")
    return previous


def check_resumable(run: Run, ckpt: checkpoint.Checkpoint | None, samples: list[Sample]) -> None:
    """Resuming continues the very run of `ckpt`: same adapter, same base model, same training set."""
    if ckpt is None:
        return
    if run.config.train.max_train_steps < ckpt.step:  # not "step 20 of 10": it cannot go back to step 10
        raise FluxnbError(f"train.max_train_steps={run.config.train.max_train_steps} is below step {ckpt.step}, which "
                          f"this run has reached ({ckpt.path}): to resume or finish it set at least {ckpt.step} "
                          f"(--max-steps {ckpt.step}, max_steps={ckpt.step}), or start over with overwrite=True "
                          "(--overwrite).")
    then = ckpt.config()
    if then.lora != run.config.lora or then.model.model_id != run.config.model.model_id:
        raise FluxnbError(f"{ckpt.path} was trained with LoRA {then.lora} on {then.model.model_id}; the config now "
                          f"asks for {run.config.lora} on {run.config.model.model_id}. Put the old values back to "
                          "resume, or start over with overwrite=True (--overwrite).")
    was, now_opt = then.train.optimizer, run.config.train.optimizer
    if was != now_opt:
        raise FluxnbError(f"{ckpt.path} holds the state of optimizer {was!r}; the config now asks for {now_opt!r}, which "
                          f"cannot continue from it. Set train.optimizer back to {was!r} to resume, or start over "
                          "with overwrite=True (--overwrite).")
    recorded, now = ckpt.info().get("data"), data_fingerprint(run, samples)
    if recorded is not None and recorded != now["data"]:  # checkpoints from before fluxnb recorded it: unchecked
        raise FluxnbError(f"{ckpt.path} was trained on another training set ({ckpt.info().get('samples', '?')} "
                          f"samples) than the one cached now ({now['samples']} samples): a caption was edited, an "
                          "image added or removed, or the caches were rebuilt since. Resuming would not continue that "
                          "run: start over with overwrite=True (--overwrite), or train in a new run directory.")
    changed = sorted(k for k, v in then.train.__dict__.items() if getattr(run.config.train, k) != v)
    if changed:
        print(f"fluxnb: resuming with changed training settings {changed}; the optimizer and LR schedule continue "
              "from the checkpoint's state.")


def clear_previous(run: Run) -> None:
    """--overwrite, once every check passed: say what goes, then delete the earlier run's checkpoints, LoRA,
    sample images and metrics. A Ctrl-C pressed before this (even one a __del__ swallowed) stops it here.

    Only what fluxnb wrote goes, by name: a file of the user's in samples/, lora/ or checkpoints/ stays."""
    check_interrupted()
    steps = [c.path.name for c in checkpoint.list_checkpoints(run.dir)]
    aside = [p.name for p in checkpoint.own_folders(run.dir) if ".damaged" in p.name]
    images = run.dir.own_images()
    parts = ([f"{len(steps)} checkpoint(s) ({', '.join(steps)})"] if steps else []) + (
        [f"{len(aside)} damaged checkpoint(s) set aside ({', '.join(aside)})"] if aside else []) + (
        ["its LoRA"] if run.dir.lora_file.is_file() else []) + (
        [f"{len(images)} file(s) in {run.dir.images.name}/"] if images else []) + (
        [run.dir.metrics.name] if run.dir.metrics.is_file() else [])
    if parts:
        print(f"fluxnb: overwrite: removing the earlier run's {', '.join(parts)} from {run.dir.root}.")
    for folder in checkpoint.own_folders(run.dir):
        shutil.rmtree(folder, ignore_errors=True)
    for path in [*images, run.dir.lora_file, run.dir.metrics]:
        path.unlink(missing_ok=True)
    for folder in (run.dir.gallery, run.dir.images, run.dir.checkpoints, run.dir.lora):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty now: a folder holding the user's files stays
