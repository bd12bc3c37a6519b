"""Never lose a run (issue 11): check before deleting, one writer per run directory, caches checked file by file,
a full disk as one message, resume only on the same data, Ctrl-C never lost. Tiny profile, CPU, a few steps each."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_run

from fluxnb import data
from fluxnb.cli import main
from fluxnb.config import ConfigError
from fluxnb.data import embeddings, latents
from fluxnb.data.store import read_samples, write_samples
from fluxnb.base.errors import FluxnbError
from fluxnb.base.files import DiskError
from fluxnb.run.lock import RunBusy, hold
from fluxnb.run import open_run
from fluxnb.train import checkpoint, guard, train

ROOT = Path(__file__).resolve().parents[1]
FEW = {"max_train_steps": 2, "sample_every": 0, "checkpoint_every": 1, "keep_checkpoints": 2}
HOLD_LOCK = "import sys, time; from fluxnb.run.lock import hold\nwith hold(sys.argv[1], 'train'):\n print('held', flush=True); time.sleep(60)"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _holder_process(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _finished(run) -> dict[str, bytes]:
    """What a finished training run left: checkpoints, LoRA, samples, metrics (path -> bytes)."""
    folders = (run.dir.checkpoints, run.dir.lora, run.dir.images)
    files = [p for f in folders if f.is_dir() for p in f.rglob("*") if p.is_file()] + [run.dir.metrics]
    return {p.relative_to(run.dir.root).as_posix(): p.read_bytes() for p in files}


# 1. --overwrite checks everything first
def test_overwrite_checks_everything_before_deleting_and_says_what_it_removes(tmp_path, tmp_path_factory, capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, live=False)
    good, before = run.config, _finished(run)
    assert run.dir.lora_file.is_file() and "checkpoints/step-2/state.json" in before
    with pytest.raises(ConfigError, match="max_train_steps"):
        train(run, overwrite=True, max_steps=0, live=False)
    broken = make_run(tmp_path / "run", tmp_path_factory, lora={"targets": "no_such_layer"})  # fails at model load
    with pytest.raises(FluxnbError, match="match no layer"):
        train(broken, overwrite=True, live=False)
    moved = make_run(tmp_path / "run", tmp_path_factory, model={"model_id": str(tmp_path / "gone")})
    with pytest.raises(FluxnbError):
        train(moved, overwrite=True, live=False)
    assert _finished(run) == before, "a failed --overwrite deleted the finished run"
    capsys.readouterr()
    run.config = good
    run.save()
    train(run, overwrite=True, live=False)
    assert "removing the earlier run's 2 checkpoint(s) (step-1, step-2), its LoRA" in capsys.readouterr().out


def test_overwrite_deletes_only_the_files_fluxnb_wrote(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, live=False)
    theirs = {run.dir.images / "00_sun.png": b"a user's image", run.dir.images / "step-final.png": b"theirs too",
              run.dir.gallery / "favourite.jpg": b"kept", run.dir.lora / "other_lora.safetensors": b"another LoRA",
              run.dir.checkpoints / "notes.txt": b"mine", run.dir.checkpoints / "step-best" / "x.bin": b"a copy"}
    ours = [run.dir.images / "step-000050.png", run.dir.comparison, run.dir.gallery / "00.png",  # an older grid, 04's
            run.dir.gallery / "prompts.json", run.dir.checkpoints / "step-7.tmp" / "state.json"]  # and a killed save's
    for path, content in [*theirs.items(), *((p, b"fluxnb's") for p in ours)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    train(run, overwrite=True, live=False)
    assert {p: p.read_bytes() for p in theirs if p.is_file()} == theirs, "--overwrite deleted a user's file"
    assert not [p for p in ours if p.exists()] and [c.step for c in checkpoint.list_checkpoints(run.dir)] == [1, 2]


@pytest.mark.parametrize("layout", ["the dataset folder", "inside the dataset", "around the dataset"])
def test_a_run_directory_overlapping_the_dataset_is_refused_before_anything_is_written(layout, tmp_path, tiny_assets,
                                                                                       capsys):
    import shutil

    data = tmp_path / "run" / "data" if layout == "around the dataset" else tmp_path / "data"
    shutil.copytree(tiny_assets.dataset, data)
    root = {"the dataset folder": data, "inside the dataset": data / "run"}.get(layout, tmp_path / "run")
    before = sorted(tmp_path.rglob("*"))
    assert main(["embed", "--run-dir", str(root), "--dataset", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "must be apart from your images" in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


# 2. one writer per run directory
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken(tmp_path, tmp_path_factory,
                                                                                          capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    proc = _holder_process(run.dir.lock)
    try:
        with pytest.raises(RunBusy, match=rf"PID {proc.pid} .*train.*kill {proc.pid}"):
            train(run, live=False)
        with pytest.raises(RunBusy):
            run.save()  # a notebook's form saved while the CLI trains
        capsys.readouterr()
        assert main(["train", "--run-dir", str(run.dir.root)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"PID {proc.pid}" in err and len(err.splitlines()) == 1
        assert not run.dir.checkpoints.exists() and not run.dir.metrics.exists()  # nothing was touched
    finally:
        proc.kill()
        proc.wait()
    with hold(run.dir.lock, "test"), hold(run.dir.lock, "nested"):  # re-entrant within one process
        run.save()
    assert f"locked by PID {proc.pid}" in capsys.readouterr().out  # the killed holder's lock, detected and taken
    with hold(run.dir.lock, "again"):
        pass
    assert "locked by" not in capsys.readouterr().out  # released cleanly: nothing stale the second time


def test_a_holder_that_has_not_written_its_name_is_never_called_pid_question_mark(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    script = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)")  # between flock and write
    proc = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy) as err:
            with hold(lock, "train"):
                pass
    finally:
        proc.kill()
        proc.wait()
    message = str(err.value)
    assert "?" not in message and "is being written by another process, so train cannot run now" in message, message


def test_a_filesystem_without_file_locks_says_so_once_and_goes_on(tmp_path, monkeypatch, capsys):
    from fluxnb.run import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # some network mounts

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    for _ in range(2):
        with hold(tmp_path / "run" / ".lock", "train"):
            pass
    assert capsys.readouterr().out.count("filesystem without file locks") == 1


def test_a_read_only_run_directory_is_one_line_and_export_elsewhere_still_works(tmp_path, tmp_path_factory,
                                                                                 monkeypatch, capsys):
    from fluxnb.run import lock

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 1})
    train(run, live=False)
    real = os.open

    def read_only(path, flags, *args, **kwargs):  # the run directory is on a read-only mount
        if str(path).startswith(str(run.dir.root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", read_only)
    capsys.readouterr()
    for args in (["latents"], ["train", "--resume"], ["export"], ["push", "--repo-id", "name", "--dry-run"]):
        assert main([args[0], "--run-dir", str(run.dir.root), *args[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot be written (Read-only file system)" in err and len(err.splitlines()) == 1, err
    out = tmp_path / "elsewhere" / "mine.safetensors"
    assert main(["export", "--run-dir", str(run.dir.root), "--out", str(out)]) == 0 and out.is_file()


# 3. a stopped `latents --overwrite` leaves a mix: training refuses it
def test_training_refuses_latents_left_half_rebuilt_by_a_stopped_overwrite(tmp_path, tmp_path_factory, monkeypatch):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    run.config = run.config.replace(data={"width": 32, "height": 48})
    run.save()
    prepared = data.check_dataset(run.config.data, progress=False)
    vae = latents.load_vae(run.config.model, run.hw)
    saved, real = [], latents.save_latent

    def killed_after_three(*args, **kwargs):
        if len(saved) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) midway through the re-encoding
        saved.append(real(*args, **kwargs))

    monkeypatch.setattr(latents, "save_latent", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        latents.cache_latents(run, vae, prepared, overwrite=True, progress=False)
    assert latents.cached_size(run.dir) == (32, 48)  # meta.json already says the new size
    with pytest.raises(FluxnbError, match=r"13 of 16 samples have no latent made with this run's settings.*latents"):
        train(run, live=False)
    monkeypatch.setattr(latents, "save_latent", real)
    latents.cache_latents(run, vae, prepared, progress=False)  # running notebook 02 again finishes the job
    guard.check_inputs(run, read_samples(run.dir))


def test_a_nan_in_a_cached_input_names_its_file_and_step_not_the_learning_rate(tmp_path, tmp_path_factory, capsys):
    from fluxnb.base.files import load_tensors, save_tensors, tensors_metadata

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    root = run.dir.root
    first = read_samples(run.dir)[0]
    latent, text = latents.latent_path(run.dir, first.id), embeddings.embedding_path(run.dir, first.caption)
    for path, key, fix in ((latent, "mean", "latents"), (text, "prompt_embeds", "embed")):
        good, meta = path.read_bytes(), tensors_metadata(path)
        tensors = load_tensors(path)
        tensors[key].view(-1)[7] = float("nan")  # one number in one file: the loss would become NaN
        save_tensors(path, tensors, metadata=meta)
        with pytest.raises(FluxnbError, match=rf"{path} is broken \(NaN in cache\): run notebook 0\d "
                                              rf"\(`python -m fluxnb {fix} --run-dir {root}`\) again"):
            train(run, live=False)
        path.write_bytes(good)
    assert not run.dir.checkpoints.exists() and not run.dir.metrics.exists()  # stopped before the first step
    for path, broken in ((run.dir.samples_file, '{"id": "abc", "caption": 3}\n'),
                         (run.dir.latents / "meta.json", '{"cache_version": 1, "wid')):
        good = path.read_text()
        path.write_text(broken)
        capsys.readouterr()
        assert main(["train", "--run-dir", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path} is broken (") and len(err.splitlines()) == 1, err
        assert "python -m fluxnb latents" in err and "learning_rate" not in err and "Traceback" not in err
        path.write_text(good)
    assert train(run, live=False).lora is not None


# 4. a full disk: one message, no temp files, nothing lost
def _failing_after(n: int, real):
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    return write


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_a_full_disk_while_training_is_one_message_and_resume_continues(tmp_path, tmp_path_factory, monkeypatch):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 3})
    monkeypatch.setattr(checkpoint.torch, "save", _failing_after(1, torch.save))  # step-2's training_state.pt
    with pytest.raises(DiskError, match=r"could not write to .*checkpoints: the disk is full \(it needs about "
                                        r"[\d,.]+ [KM]iB, .* free\)\. Nothing already written was lost"):
        train(run, live=False)
    monkeypatch.undo()
    assert not _temp_files(run.dir.root)
    assert [c.step for c in checkpoint.list_checkpoints(run.dir)] == [1]
    assert train(run, resume=True, live=False).lora is not None


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_inside_torch_save_is_the_same_one_line_message(tmp_path, tmp_path_factory, monkeypatch):
    import contextlib

    real = checkpoint.atomic_path

    @contextlib.contextmanager
    def on_a_full_disk(path, needed=None):  # the optimizer state's file lands on a full disk (torch's own writer)
        with real(path, needed) as part:
            part.unlink()
            part.symlink_to("/dev/full")
            yield part

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    monkeypatch.setattr(checkpoint, "atomic_path", on_a_full_disk)
    with pytest.raises(DiskError, match=r"could not write to .*checkpoints: the disk is full"):
        train(run, live=False)
    monkeypatch.undo()
    assert not _temp_files(run.dir.root) and not checkpoint.list_checkpoints(run.dir)


def test_a_loss_plot_that_cannot_be_written_never_stops_the_lora_being_saved(tmp_path, tmp_path_factory, monkeypatch,
                                                                             capsys):
    from fluxnb.train import monitor

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(monitor, "save_figure", full)
    result = train(make_run(tmp_path / "run", tmp_path_factory, train=FEW), live=False)
    assert result.lora is not None and result.lora.is_file()
    assert "warning: the loss plot was not saved" in capsys.readouterr().out


@pytest.mark.parametrize("step", ["embed", "latents"])
def test_a_full_disk_while_caching_is_one_line_and_keeps_what_was_written(step, tmp_path, monkeypatch, capsys):
    args = ["--run-dir", str(tmp_path / "run")]
    if step == "latents":
        assert main(["embed", *args]) == 0
    folder = tmp_path / "run" / ("embeddings" if step == "embed" else "latents")
    monkeypatch.setattr(Path, "write_bytes", _failing_after(3, Path.write_bytes))
    capsys.readouterr()
    assert main([step, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: could not write to {folder}: the disk is full (it needs about"), err
    assert "Nothing already written was lost" in err and len(err.splitlines()) == 1
    # meta.json and two files were written before the disk filled up
    assert not _temp_files(tmp_path / "run") and len(list(folder.glob("*.safetensors"))) == 2
    monkeypatch.undo()
    assert main([step, *args]) == 0
    assert "2 reused from the cache" in capsys.readouterr().out


# 5. relative paths are stored absolute
def test_relative_model_and_dataset_paths_work_from_another_working_directory(tmp_path, tiny_assets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").symlink_to(tiny_assets.model)
    (tmp_path / "mydata").symlink_to(tiny_assets.dataset)
    assert main(["embed", "--run-dir", "run", "--model", "mymodel", "--dataset", "mydata"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["model_id"], saved["data"]["dataset"]) == (str(tmp_path / "mymodel"), str(tmp_path / "mydata"))
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where the notebooks run
    assert main(["latents", "--run-dir", "../run"]) == 0
    run = open_run(tmp_path / "run", verbose=False)
    assert run.config.replace(data={"dataset": "user/name"}).with_local_paths_resolved().data.dataset == "user/name"


# 6. resume only on the data the checkpoint was trained on
def test_resume_on_a_changed_training_set_is_refused(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, stop_after=1, live=False)
    write_samples(run.dir, read_samples(run.dir)[1:])  # an image removed (and notebook 01 re-run)
    with pytest.raises(FluxnbError, match=r"another training set \(16 samples\) than the one cached now \(15 "
                                          r"samples\).*--overwrite.*new run directory"):
        train(run, resume=True, live=False)


def test_max_steps_below_the_step_reached_is_refused_not_step_20_of_10(tmp_path, tmp_path_factory, capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, live=False)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run.dir.root), "--resume", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_train_steps=1 is below step 2" in err and "--max-steps 2" in err and len(err.splitlines()) == 1, err
    assert run.config.train.max_train_steps == open_run(run.dir.root, verbose=False).config.train.max_train_steps


# 7. Ctrl-C
class Finalized:
    def __del__(self):  # like regex's Group.__del__: a SIGINT landing here is "Exception ignored"
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass


def test_a_ctrl_c_swallowed_by_a_del_during_start_up_still_stops_training(tmp_path, tmp_path_factory, monkeypatch):
    from fluxnb.train import session

    real = session.load_scales

    def load_scales(run):
        Finalized()
        return real(run)

    monkeypatch.setattr(session, "load_scales", load_scales)
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    result = train(run, live=False)
    assert result.interrupted and result.step == 0 and not run.dir.lora_file.exists()


def test_a_ctrl_c_swallowed_before_overwrite_deletes_nothing(tmp_path, tmp_path_factory, monkeypatch):
    from fluxnb.train import session

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, live=False)
    before, real = _finished(run), session.load_for_training

    def load_for_training(run):  # the model loads last before --overwrite's deletion
        Finalized()
        return real(run)

    monkeypatch.setattr(session, "load_for_training", load_for_training)
    with pytest.raises(KeyboardInterrupt):
        train(run, overwrite=True, live=False)
    assert _finished(run) == before, "--overwrite deleted the run after a Ctrl-C"


def test_cli_ctrl_c_swallowed_at_start_up_stops_the_command_and_deletes_nothing(tmp_path, tmp_path_factory,
                                                                               monkeypatch, capsys):
    import fluxnb.run.open

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    train(run, live=False)
    before, real = _finished(run), fluxnb.run.open.open_run

    def open_run(*args, **kwargs):  # before train() itself watches for Ctrl-C
        Finalized()
        return real(*args, **kwargs)

    monkeypatch.setattr(fluxnb.run.open, "open_run", open_run)  # what the CLI's open_existing_run calls
    assert main(["train", "--run-dir", str(run.dir.root), "--overwrite"]) == 130
    assert _finished(run) == before, "--overwrite deleted the run after a Ctrl-C"
    assert capsys.readouterr().err.strip().endswith("interrupted")


def test_cli_ctrl_c_swallowed_after_the_loop_is_not_a_success(tmp_path, tmp_path_factory, monkeypatch, capsys):
    from fluxnb.train import validation

    real = validation.summary

    def summary(*args):  # the last thing train() does
        Finalized()
        return real(*args)

    monkeypatch.setattr(validation, "summary", summary)
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    assert main(["train", "--run-dir", str(run.dir.root)]) == 130
    assert run.dir.lora_file.is_file() and capsys.readouterr().err.strip().endswith("interrupted")


def test_a_ctrl_c_while_finishing_says_where_the_run_stands_and_resume_finishes_it(tmp_path, tmp_path_factory,
                                                                                   monkeypatch, capsys):
    """Issue 27.13: a Ctrl-C during the last save (after the loop) escaped train() without the usual line."""
    from fluxnb.model import lora

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    real = lora.save_lora

    def save_lora(*args):  # the final LoRA; the checkpoints before it are in place
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "save_lora", save_lora)
    try:
        result = train(run, live=False)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped train() without saying where the run stands")
    assert result.interrupted and result.checkpoint == run.dir.checkpoints / "step-2" and not run.dir.lora_file.exists()
    assert f"interrupted at step 2; to continue from {run.dir.checkpoints / 'step-2'} (step 2)" in capsys.readouterr().out
    monkeypatch.setattr(lora, "save_lora", real)
    again = train(run, resume=True, live=False)
    assert not again.interrupted and again.step == 2 and run.dir.lora_file.is_file()


def test_a_ctrl_c_swallowed_while_finishing_in_a_notebook_is_not_lost(tmp_path, tmp_path_factory, monkeypatch):
    """Notebook 03 calls train() with no CLI around it: a Ctrl-C that a __del__ swallowed after the loop used to be
    dropped there, and the notebook ran on into its next cells."""
    from fluxnb.train import validation

    real = validation.summary

    def summary(*args):  # after the LoRA is saved
        Finalized()
        return real(*args)

    monkeypatch.setattr(validation, "summary", summary)
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    result = train(run, live=False)
    assert result.interrupted and run.dir.lora_file.is_file()


def test_a_watched_call_raises_a_ctrl_c_swallowed_after_its_last_check():
    from fluxnb.base.interrupts import watching_interrupts

    @watching_interrupts
    def finishing():  # e.g. train's objects freed as it returns
        Finalized()
        return "done"

    with pytest.raises(KeyboardInterrupt):
        finishing()


def test_a_watched_call_that_answered_its_ctrl_c_returns():
    from fluxnb.base.interrupts import interrupt_handled, watching_interrupts

    @watching_interrupts
    def answering():  # like train: catches the Ctrl-C, says where the run stands, returns
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            interrupt_handled()
        return "answered"

    assert answering() == "answered"


def test_cli_ctrl_c_during_the_interpreters_shutdown_exits_130(tmp_path, tmp_path_factory):
    """A Ctrl-C after `python -m fluxnb train` returned, while Python shuts down (torch.library's atexit
    finalizers), was printed as "Exception ignored in atexit callback ... KeyboardInterrupt" and the process exited
    0. The hook sends the SIGINT from an atexit callback, deterministically."""
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW)
    hook = ("import atexit, os, runpy, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
            "sys.argv = ['fluxnb', 'train', '--run-dir', sys.argv[1]]\n"
            "runpy.run_module('fluxnb', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", hook, str(run.dir.root)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1] == "interrupted" and "Exception ignored" not in proc.stderr
    assert run.dir.lora_file.is_file() and "LoRA saved to" in proc.stdout


def test_cli_ctrl_c_names_the_checkpoint_written_last_and_says_resume(tmp_path, tmp_path_factory, monkeypatch, capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 4})
    real = checkpoint.save

    def save(*args, **kwargs):
        saved = real(*args, **kwargs)
        if saved.step == 2:
            raise KeyboardInterrupt  # after step-2 is in place, before save() returns (e.g. while pruning)
        return saved

    monkeypatch.setattr(checkpoint, "save", save)
    assert main(["train", "--run-dir", str(run.dir.root)]) == 130
    out = capsys.readouterr().out
    assert f"from {run.dir.checkpoints / 'step-2'} (step 2)" in out, out
    assert f"python -m fluxnb train --run-dir {run.dir.root} --resume" in out and "resume=True" not in out


def test_cli_resume_without_a_checkpoint_says_it_starts_over_or_refuses_to_replace_a_lora(tmp_path, tmp_path_factory,
                                                                                         capsys):
    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 1})
    assert main(["train", "--run-dir", str(run.dir.root), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    for ckpt in checkpoint.list_checkpoints(run.dir):
        ckpt.path.rename(ckpt.path.with_name("deleted"))  # checkpoints cleaned up to save space
    assert main(["train", "--run-dir", str(run.dir.root), "--resume"]) == 2
    assert "holds a finished LoRA but no checkpoint" in capsys.readouterr().err


# 8. a failed first step, long captions, huge images
def test_a_failed_first_embed_leaves_no_config_behind(tmp_path, capsys):
    root = tmp_path / "run"
    assert main(["embed", "--run-dir", str(root), "--dataset", str(tmp_path / "no-such-folder")]) == 2
    assert not (root / "config.json").exists()
    assert main(["latents", "--run-dir", str(root)]) == 2
    assert "has no config.json: run notebook 01 first" in capsys.readouterr().err


def test_kill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_lora(tmp_path, tmp_path_factory):
    settings = dict(train={"max_train_steps": 4, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2,
                           "sample_every": 0, "lr_scheduler": "cosine"}, lora={"rank": 4, "alpha": 4.0})
    whole = make_run(tmp_path / "whole", tmp_path_factory, **settings)
    train(whole, live=False)
    killed = make_run(tmp_path / "killed", tmp_path_factory, **settings)
    marker = tmp_path / "saving"
    script = ("import sys, time, torch\nfrom pathlib import Path\nfrom fluxnb.run import open_run\n"
              "from fluxnb.train import checkpoint, train\nreal = torch.save\n"
              "def slow(obj, f, *a, **k):\n    real(obj, f, *a, **k)\n"
              "    if 'step-3.tmp' in str(getattr(f, 'name', f)):\n        Path(sys.argv[2]).touch(); time.sleep(120)\n"
              "checkpoint.torch.save = slow\ntrain(open_run(sys.argv[1], verbose=False), resume=False, live=False)\n")
    log = tmp_path / "subprocess.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, str(killed.dir.root), str(marker)], env=_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), f"the training subprocess never reached step 3's checkpoint: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)  # mid-write: step-3.tmp/ is half made, the run's lock is still held
    proc.wait()
    assert (killed.dir.checkpoints / "step-3.tmp").is_dir() and checkpoint.latest(killed.dir).step == 2
    train(killed, resume=True, live=False)
    assert not _temp_files(killed.dir.root)
    a, b = load_file(whole.dir.lora_file), load_file(killed.dir.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs"


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A 1-bit greyscale PNG of width x height whose pixel data is all zeros (a few kB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj()
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_huge_image_is_one_line_of_the_report_and_is_never_decoded(tmp_path, tiny_assets, recwarn):
    import shutil

    from fluxnb.config import DataConfig

    folder = tmp_path / "data"
    shutil.copytree(tiny_assets.dataset, folder)
    _png_header_only(folder / "scan.png", 10_000, 10_000)
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "scan.png", "text": "a huge scan"}) + "\n")
    report = data.check_dataset(DataConfig(dataset=str(folder), width=64, height=96), progress=False).report
    assert [s for s in report.skipped if s.startswith("scan.png: 10000x10000 pixels (100 MP")], str(report)
    assert not [w for w in recwarn if "DecompressionBomb" in w.category.__name__]


def test_very_long_captions_do_not_flood_the_log(tmp_path, tiny_assets, monkeypatch):
    import logging
    import shutil

    from fluxnb.config import DataConfig
    from fluxnb.data import embeddings

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name in ("transformers", "diffusers"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [handler])
    folder = tmp_path / "data"
    shutil.copytree(tiny_assets.dataset, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    words = " ".join(f"word{i}" for i in range(5000))  # a 5000-word caption on every image
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r | {"text": f"{r['text']} {words}"}) + "\n" for r in rows))
    run = open_run(tmp_path / "run", verbose=False)
    prepared = data.check_dataset(DataConfig(dataset=str(folder)), embeddings.load_tokenizer(run.config.model), progress=False)
    assert "longer than max_sequence_length=77" in str(prepared.report)  # said once, in the report
    pipe = embeddings.load_text_encoders(run.config.model, run.hw)
    embeddings.encode(pipe, prepared.captions[:4], 77, run.hw.device)
    said = [r.getMessage() for r in records]
    assert not [m for m in said if "truncated" in m or "Token indices" in m], [m[:200] for m in said]


def test_out_of_gpu_memory_says_what_to_change_and_where_the_run_stands(tmp_path, tmp_path_factory, monkeypatch,
                                                                        capsys):
    from fluxnb.train import TrainingOutOfMemory, session, step

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 4})
    real = step.optimizer_step

    def optimizer_step(accelerator, wrapped, state, *args):
        if state.step == 2:  # the third step: what a too-large layout or another program on the GPU gives
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 216.00 MiB.")
        return real(accelerator, wrapped, state, *args)

    monkeypatch.setattr(step, "optimizer_step", optimizer_step)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(run, live=False)
    message = str(caught.value)
    assert "out of memory in optimizer step 3" in message and str(run.dir.checkpoints / "step-2") in message
    tc = run.config.train  # the layout's knobs, with their values now
    assert f"train.keep_activations (now {tc.keep_activations})" in message, message
    assert f"train.batch_size (now {tc.batch_size};" in message, message
    assert "restart this notebook's kernel" not in message
    assert message.endswith("continue with train(run, resume=True).")
    assert not run.dir.lora_file.exists() and [c.step for c in checkpoint.list_checkpoints(run.dir)] == [1, 2]
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run.dir.root), "--resume"]) == 2  # the CLI: one line, its own command
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"python -m fluxnb train --run-dir {run.dir.root} --resume" in err, err

    monkeypatch.setattr(session, "in_notebook", lambda: True)  # a notebook's kernel holds the failed step's tensors
    in_a_notebook = str(session.out_of_memory(0, None, run.config.train, run.hw, "x"))
    assert "restart this notebook's kernel (it holds" in in_a_notebook and "no checkpoint was written yet" in in_a_notebook


def test_out_of_memory_after_a_budget_adjustment_names_the_settings_in_force(tmp_path, tmp_path_factory, monkeypatch):
    """After the first step the loop may give back kept activations (speed.fit_budget); a later out-of-memory
    message names the value in force then, not the plan's."""
    from dataclasses import replace

    from fluxnb.train import TrainingOutOfMemory, speed, step

    run = make_run(tmp_path / "run", tmp_path_factory, train=FEW | {"max_train_steps": 4, "keep_activations": 3})
    monkeypatch.setattr(speed, "fit_budget", lambda model, m, t, hw, tokens: (m, replace(t, keep_activations=1)))
    real = step.optimizer_step

    def optimizer_step(accelerator, wrapped, state, *args):
        if state.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 216.00 MiB.")
        return real(accelerator, wrapped, state, *args)

    monkeypatch.setattr(step, "optimizer_step", optimizer_step)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(run, live=False)
    assert "train.keep_activations (now 1)" in str(caught.value), str(caught.value)


# 9. what a killed write leaves (issue 27.13): the next step writing that folder removes it, and only that
KILLED_WRITE = ("import contextlib, os, sys\nfrom fluxnb.base.files import atomic_path\nwith contextlib.ExitStack() as s:\n"
                " for target in sys.argv[2:]:\n  s.enter_context(atomic_path(target)).write_bytes(b'half')\n"
                " print('writing', flush=True)\n if sys.argv[1] == 'kill': os._exit(9)\n sys.stdin.read()\n")


def _write_then(how: str, *targets: Path) -> subprocess.Popen:
    """A process writing `targets` through atomic_path: killed ("kill", os._exit midway) or still at it ("hold")."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, how, *map(str, targets)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "writing"
    if how == "kill":
        assert proc.wait() == 9
    return proc


def _temps_of(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_step_in_that_folder(tmp_path, tiny_assets,
                                                                                      capsys):
    """caption (in the user's dataset folder), embed, latents and export each remove what a killed write of theirs
    left there: only temporaries of the files they write; a user's look-alikes stay."""
    from lora_helpers import make_lora

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_assets.dataset, data)
    theirs = [data / ".cat.png.4242-abcdefgh.tmp", data / ".metadata.jsonl.notes.tmp", run / "latents" / "keep.tmp"]
    args = ["--run-dir", str(run), "--dataset", str(data)]
    steps = {"caption": [data / "metadata.jsonl"],
             "embed": [run / "embeddings" / "0123456789abcdef.safetensors", run / "samples.jsonl"],
             "latents": [run / "latents" / "0123456789abcdef.safetensors", run / "latents" / "meta.json"],
             "export": [run / "export" / "run_comfyui.safetensors"]}
    _write_then("kill", *(t for targets in steps.values() for t in targets))
    left = {step: [p for t in targets for p in _temps_of(t)] for step, targets in steps.items()}
    assert all(len(temps) == len(steps[step]) for step, temps in left.items())
    for path in theirs:
        path.write_text("a user's file")
    for step, temps in left.items():
        if step == "export":
            make_lora(tiny_assets.model, run / "lora")
        capsys.readouterr()
        assert main([step, *(args if step in ("caption", "embed") else args[:2])]) == 0
        assert not [p for p in temps if p.exists()], f"{step} left the temporaries of a killed write"
        assert "that a stopped write left in" in capsys.readouterr().out
    assert all(p.read_text() == "a user's file" for p in theirs)


def test_a_temporary_being_written_by_a_live_process_is_never_removed(tmp_path):
    """Only a write whose process is gone is swept: one still writing (another notebook captioning the same folder)
    keeps its temporary; an older fluxnb's (no PID in the name) goes only once it predates this process."""
    from fluxnb.base.temps import remove_abandoned_files

    target = tmp_path / "metadata.jsonl"
    proc = _write_then("hold", target)
    try:
        legacy_old, legacy_new = tmp_path / ".metadata.jsonl.abcdefgh.tmp", tmp_path / ".metadata.jsonl.hgfedcba.tmp"
        legacy_old.write_text("older fluxnb")
        legacy_new.write_text("older fluxnb, written now")
        os.utime(legacy_old, (time.time() - 3600,) * 2)
        live = [p for p in _temps_of(target) if p not in (legacy_old, legacy_new)]
        assert remove_abandoned_files(tmp_path, ["metadata.jsonl"]) == [legacy_old]
        assert len(live) == 1 and live[0].is_file() and legacy_new.is_file()
    finally:
        proc.communicate("")
    assert target.read_bytes() == b"half" and not live[0].exists()  # it finished its own write
