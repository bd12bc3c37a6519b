"""The envelope plumbing of benchmarks/rehearsal.py: a capped GPU as fluxnb sees it, the kernel's own peak log,
RAM limits that merge's check honours, and one notebook run through the rehearsal's runner on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxnb.run import hardware
from fluxnb.base import memory
from fluxnb.train import presets
from fluxnb.base.errors import FluxnbError
from fluxnb.run.hardware import GPUInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
H200 = GPUInfo("NVIDIA H200", (9, 0), 139.8)


@pytest.fixture
def h200(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "cuda_info", lambda: H200)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    return calls


@pytest.mark.parametrize("cap, preset", [("14.7", "t4-16gb"), ("7.6", "8-12gb"), ("23.6", "4090-24gb")])
def test_gpu_cap_makes_fluxnb_see_the_smaller_card(h200, monkeypatch, cap, preset):
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, cap)
    hw = hardware.detect("real")
    assert hw.gpu.total_gib == float(cap) and presets.pick(hw) == preset
    assert h200 == [(pytest.approx(float(cap) / H200.total_gib), 0)]  # PyTorch's allocator refuses beyond it


def test_fp16_is_a_user_choice_on_a_bf16_gpu(h200, monkeypatch):
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, "14.7")
    assert hardware.detect("real", "fp16").dtype == torch.float16  # what ModelConfig.dtype="fp16" asks for
    assert hardware.detect("real").dtype == torch.bfloat16


def test_bad_gpu_cap_is_one_clear_error(h200, monkeypatch):
    for raw in ("lots", "500"):
        monkeypatch.setenv(hardware.GPU_MEMORY_ENV, raw)
        with pytest.raises(FluxnbError, match=hardware.GPU_MEMORY_ENV):
            hardware.detect("real")
    assert h200 == []


def test_no_cap_without_the_variable(h200, monkeypatch):
    monkeypatch.delenv(hardware.GPU_MEMORY_ENV, raising=False)
    assert hardware.detect("real").gpu == H200 and h200 == []


def test_capability_emulates_an_older_gpu_and_what_follows_from_it(h200, monkeypatch):
    """FLUXNB_GPU_CAPABILITY=7.5 on an H200: a T4's fp16, no torch.compile, and attention through a T4's kernels."""
    switched = []
    monkeypatch.setattr(torch.backends.cuda, "enable_flash_sdp", lambda on: switched.append(("flash", on)))
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: switched.append(("cudnn", on)))
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, "14.7")
    assert hardware.detect("real").compiles("auto") and switched == []  # the H200 as it is
    monkeypatch.setenv(hardware.GPU_CAPABILITY_ENV, "7.5")
    hw = hardware.detect("real")
    assert hw.gpu.capability == (7, 5) and hw.gpu.total_gib == 14.7 and hw.dtype == torch.float16
    assert not hw.compiles("auto") and hw.compiles("on") and presets.pick(hw) == "t4-16gb"
    assert switched == [("flash", False), ("cudnn", False)]  # memory-efficient and math attention remain
    with pytest.raises(FluxnbError, match="no bf16"):
        hardware.detect("real", "bf16")
    for raw in ("sm75", "9.5"):  # not a capability; newer than the GPU's own
        monkeypatch.setenv(hardware.GPU_CAPABILITY_ENV, raw)
        with pytest.raises(FluxnbError, match=hardware.GPU_CAPABILITY_ENV):
            hardware.detect("real")


def test_dtype_watch_counts_what_computes_a_bf16_tensor():
    stored = torch.ones(4, dtype=torch.bfloat16)  # as read from a file saved in bf16
    watch = memory.DtypeWatch(torch.bfloat16)
    with watch:
        x = torch.ones(4, dtype=torch.float16) * 2  # fp16: not counted
        y = x.to(torch.bfloat16) + 1  # a conversion into bf16 and bf16 arithmetic: counted
        moved = stored.clone().view(2, 2).t()  # bf16 bytes copied and viewed, no arithmetic: not counted
        z = stored.to(torch.float16) * 3  # converted out of bf16 first: not counted
    assert watch.count == 2 and set(watch.ops) == {"aten._to_copy.default", "aten.add.Tensor"} and y.sum() == 12
    assert moved.dtype == torch.bfloat16 and z.dtype == torch.float16


def test_peak_log_records_anonymous_and_file_backed_peaks(tmp_path):
    log = memory.PeakLog(tmp_path / "peaks.json")
    block = bytearray(64 * 2**20)  # 64 MiB of anonymous memory, touched
    log.write()
    del block
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    assert peaks["host_RssAnon_gib"] >= 64 / 1024 and peaks["host_VmHWM_gib"] >= peaks["host_RssAnon_gib"]
    assert "host_RssFile_gib" in peaks and peaks["disk_written_gib"] >= 0


def test_host_memory_limit_lowers_available_ram(monkeypatch):
    monkeypatch.delenv(memory.HOST_MEMORY_ENV, raising=False)
    unlimited = memory.available_ram_gib()
    monkeypatch.setenv(memory.HOST_MEMORY_ENV, "1.5")
    limited = memory.available_ram_gib()
    assert limited < min(unlimited, 1.5)


def test_rehearsal_runs_a_notebook_with_its_peaks(tiny_assets, tmp_path, monkeypatch):
    """Notebook 01 through the rehearsal's per-notebook runner: the kernel itself writes its peaks."""
    import rehearsal

    from fluxnb.run import open_run

    open_run(tmp_path / "run", profile="tiny", verbose=False)  # config.json of the tiny profile
    monkeypatch.setattr(rehearsal, "make_cgroup", lambda name, gib: (None, "no cgroup here"))
    env = {"gpu_gib": 14.7, "host_gib": 11.5, "watch_dtype": "bfloat16"}
    result = rehearsal.run_notebook("01", tmp_path / "run", env, "t4", tmp_path / "log.txt", timeout=600)
    assert result["rc"] == 0, (tmp_path / "log.txt").read_text()[-3000:]
    kernel = result["kernel"]
    assert kernel["watched_dtype"] == "bfloat16" and kernel["watched_ops"] == 0 and result["dtype_ok"]
    assert kernel["pid"] > 0 and 0 < kernel["host_RssAnon_gib"] <= kernel["host_VmHWM_gib"] < 11.5
    assert result["ok"] and result["disk_growth_mib"] > 0  # the embeddings it cached
    assert (tmp_path / "t4-01_embeddings.ipynb").is_file()  # the executed copy, beside the log (it comes back)


def test_a_rehearsal_command_starts_inside_its_cgroup(tmp_path):
    """The runner's own PID (the one it execs into) is what lands in the group's cgroup.procs."""
    import rehearsal

    (tmp_path / "cgroup.procs").write_text("")
    command = rehearsal.in_group([sys.executable, "-c", "import os; print(os.getpid())"], tmp_path)
    pid = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    assert pid and (tmp_path / "cgroup.procs").read_text().strip() == pid


def test_dtype_set_in_the_config_takes_effect_on_save(tiny_assets, tmp_path):
    """The supported way to compute in fp16 (a T4's only choice) on any machine: model.dtype, then run.save();
    every loader reads run.hw.dtype, and the next notebook's open_run reads it from config.json."""
    from fluxnb.run import open_run

    run = open_run(tmp_path, profile="tiny", verbose=False)
    assert run.hw.dtype == torch.float32
    run.config.model.dtype = "fp16"
    run.save()
    assert run.hw.dtype == torch.float16
    assert open_run(tmp_path, verbose=False).hw.dtype == torch.float16


def test_kontext_rehearsal_configures_the_base_its_pairs_and_a_plan_with_control_tokens(tmp_path, monkeypatch):
    """--kontext: the run is configured as notebook 01 then 03 would (base and data first, then the preset), so
    the envelope's plan counts each sample's control tokens: the T4's eager plan halves its batch for them."""
    import rehearsal

    env = rehearsal.ENVELOPES["t4"]
    monkeypatch.setattr(rehearsal, "envelope_hardware", lambda env: hardware.Hardware(
        "real", torch.device("cuda"), torch.float16, GPUInfo("NVIDIA H200", (7, 5), env["gpu_gib"]), "envelope"))
    configs = {}
    for kontext in (False, True):
        rehearsal.configure(tmp_path / str(kontext), env, Path("/m"), Path("/d"), Path("/nf4"), steps=5,
                            buckets=False, kontext=kontext)
        configs[kontext] = json.loads((tmp_path / str(kontext) / "config.json").read_text())
    plain, kontext = configs[False], configs[True]
    assert (plain["model"]["base"], kontext["model"]["base"]) == ("FLUX.1-dev", "FLUX.1-Kontext-dev")
    assert kontext["data"]["validation_prompts"] == rehearsal.KONTEXT_PROMPTS
    assert kontext["model"]["prequantized"] == plain["model"]["prequantized"] == "/nf4"
    assert (plain["train"]["batch_size"], kontext["train"]["batch_size"]) == (4, 2)
