"""fluxnb.presets: the preset follows the GPU, lands in the real default config, and the form edits the config."""

import pytest
import torch

from fluxnb import hardware, presets
from fluxnb.config import RunConfig
from fluxnb.hardware import GPUInfo
from fluxnb.nb.forms import training_form


def _hw(name, gib, capability=(8, 9)):
    return hardware.Hardware("real", torch.device("cuda"), torch.bfloat16, GPUInfo(name, capability, gib), "test")


@pytest.mark.parametrize("gpu, gib, expected", [("RTX 3060", 12.0, "8-12gb"), ("RTX 3070", 7.8, "8-12gb"),
                                                ("Tesla T4", 15.6, "t4-16gb"),
                                                ("RTX 4090", 23.6, "4090-24gb"), ("H100 80GB", 79.2, "h100-80gb"),
                                                ("A100 40GB", 39.4, "4090-24gb")])
def test_preset_follows_gpu_memory(gpu, gib, expected):
    assert presets.pick(_hw(gpu, gib)) == expected


def test_every_preset_is_a_valid_config_and_recognisable():
    gpus = {"8-12gb": ("RTX 3060", 12.0), "t4-16gb": ("Tesla T4", 15.6), "4090-24gb": ("RTX 4090", 23.6),
            "h100-80gb": ("H100", 79.2)}
    for name, preset in presets.PRESETS.items():
        cfg = presets.apply(RunConfig(), name)  # validated by RunConfig.replace
        assert presets.matching(cfg, _hw(*gpus[name])) == name
        assert cfg.lora == RunConfig().lora  # presets change how the base is held, not the LoRA
    blog = RunConfig()  # the blog's own 4090 run: batch 1 x 4 accumulation, NF4
    fast = presets.apply(blog, "4090-24gb")
    assert fast.model == blog.model and fast.train.compile == "auto"
    assert (fast.train.batch_size, fast.train.gradient_accumulation_steps) == (4, 1)  # same 4 samples per step
    assert fast.replace(train={"batch_size": 1, "gradient_accumulation_steps": 4}) == blog
    assert presets.apply(RunConfig(), "h100-80gb").model.quantization == "nf4"
    assert presets.apply(RunConfig(), "8-12gb").model.offload_blocks == 57


@pytest.mark.parametrize("preset, gpu, size, batch", [
    ("t4-16gb", ("Tesla T4", 15.6), (512, 768), 4), ("t4-16gb", ("Tesla T4", 15.6), (512, 512), 4),
    ("t4-16gb", ("Tesla T4", 15.6), (768, 768), 2), ("t4-16gb", ("Tesla T4", 15.6), (1024, 1024), 1),
    ("8-12gb", ("RTX 3060", 12.0), (1024, 1024), 1), ("4090-24gb", ("RTX 4090", 23.6), (512, 768), 4),
    ("4090-24gb", ("RTX 4090", 23.6), (1024, 1024), 2), ("h100-80gb", ("H100", 79.2), (1536, 1536), 1)])
def test_bigger_images_trade_batch_for_accumulation(preset, gpu, size, batch):
    """Activation memory grows with the image tokens in a batch; each preset caps them (measured levels)."""
    cfg = presets.apply(RunConfig().replace(data={"width": size[0], "height": size[1]}), preset)
    assert cfg.train.batch_size == batch and batch * cfg.train.gradient_accumulation_steps == 4
    assert presets.matching(cfg, _hw(*gpu)) == preset


def test_real_default_config_uses_the_gpu_preset(monkeypatch, tmp_path):
    from fluxnb.run import open_run

    monkeypatch.setattr(hardware, "cuda_info", lambda: GPUInfo("Tesla T4", (7, 5), 15.6))
    monkeypatch.delenv("FLUXNB_PROFILE", raising=False)
    run = open_run(tmp_path / "run", verbose=False)
    assert run.hw.dtype == torch.float16 and presets.matching(run.config, run.hw) == "t4-16gb"
    assert run.config.model.quantization == "nf4" and run.config.train.optimizer == "adamw8bit"


def test_a_config_no_preset_matches_is_custom():
    assert presets.matching(RunConfig().replace(train={"optimizer": "adamw"}), _hw("RTX 4090", 23.6)) == "custom"


def test_form_applies_a_preset_and_edits_the_config():
    import ipywidgets as W

    cfg = presets.apply(RunConfig(), "4090-24gb")
    form = training_form(cfg, _hw("RTX 4090", 23.6))
    chooser = form.children[0]
    assert chooser.value == "4090-24gb"
    chooser.value = "h100-80gb"
    assert cfg.model.quantization == "nf4" and cfg.train.optimizer == "adamw"
    forms = form.children[2].children
    rank = next(w for w in forms[0].children if isinstance(w, W.IntText) and w.description == "rank")
    rank.value = 8
    assert cfg.lora.rank == 8
    labels = {w.description for f in forms for w in f.children if hasattr(w, "description")}
    assert {"learning rate", "max train steps", "gradient accumulation steps", "sample every", "checkpoint every",
            "width", "height", "alpha", "targets"} <= labels
