"""fluxnb.train.presets: the preset follows the GPU, lands in the real default config, and the form edits the config."""

import pytest
import torch

from fluxnb.run import hardware
from fluxnb.train import presets
from fluxnb.config import RunConfig
from fluxnb.run.hardware import GPUInfo
from fluxnb.nb.forms import training_form


@pytest.fixture(autouse=True)
def triton(monkeypatch):
    """As on a Linux CUDA machine, where torch.compile has Triton (presets plan for compiled blocks there)."""
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)


def _hw(name, gib, capability=(8, 9)):
    return hardware.Hardware("real", torch.device("cuda"), torch.bfloat16, GPUInfo(name, capability, gib), "test")


@pytest.mark.parametrize("gpu, gib, expected", [("RTX 3060", 12.0, "8-12gb"), ("RTX 3070", 7.8, "8-12gb"),
                                                ("Tesla T4", 15.6, "t4-16gb"),
                                                ("RTX 4090", 23.6, "4090-24gb"), ("H100 80GB", 79.2, "h100-80gb"),
                                                ("A100 40GB", 39.4, "4090-24gb")])
def test_preset_follows_gpu_memory(gpu, gib, expected):
    assert presets.pick(_hw(gpu, gib)) == expected


GPUS = {"8-12gb": ("RTX 3060", 12.0), "t4-16gb": ("Tesla T4", 14.7, (7, 5)), "4090-24gb": ("RTX 4090", 23.6),
        "h100-80gb": ("H100", 79.2, (9, 0))}


def test_every_preset_is_a_valid_config_and_recognisable():
    for name in presets.PRESETS:
        hw = _hw(*GPUS[name])
        cfg = presets.apply(RunConfig(), name, hw)  # validated by RunConfig.replace
        assert presets.matching(cfg, hw) == name
        assert cfg.lora == RunConfig().lora and cfg.model.quantization == "nf4"  # same LoRA, same NF4 base
        assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 4  # the blog's 4 samples per step
        assert cfg.train.compile == "auto" and cfg.train.memory_budget_gib == presets.budget_for(name, hw)
    blog = RunConfig()  # the blog's own 4090 run: batch 1 x 4 accumulation, NF4
    fast = presets.apply(blog, "4090-24gb")
    assert (fast.train.batch_size, fast.train.gradient_accumulation_steps) == (4, 1)  # same 4 samples per step
    assert fast.replace(train={"batch_size": 1, "gradient_accumulation_steps": 4, "keep_activations": 0,
                               "optimizer": "adamw8bit", "memory_budget_gib": 0.0},
                        model={"offload_blocks": 0}) == blog


def test_presets_are_named_budgets_filled_by_the_policy():
    """Bigger budgets buy speed in the policy's order: batch, then kept activations, then resident blocks."""
    small, t4, big, h100 = (presets.apply(RunConfig(), n) for n in ("8-12gb", "t4-16gb", "4090-24gb", "h100-80gb"))
    assert small.model.offload_blocks == big.model.offload_blocks == 57
    assert t4.model.offload_blocks == 0  # Colab's 12.7 GB of RAM: nothing streams there
    assert 0 < small.train.keep_activations < big.train.keep_activations < 57
    assert t4.train.keep_activations == 0  # eager on a T4: kept activations buy no time there
    assert h100.model.offload_blocks == 0 and not h100.train.gradient_checkpointing  # all resident, no recompute
    assert {c.train.optimizer for c in (small, t4, big, h100)} == {"adamw"}  # 8-bit state would save 27 MiB
    assert presets.budget_for("h100-80gb", _hw("L40S", 44.4)) == 44.4  # a 48 GB card plans for its own memory


def test_t4_preset_says_compile_stays_off_there():
    assert "torch.compile stays off on a T4" in presets.PRESETS["t4-16gb"].description
    t4 = _hw("Tesla T4", 14.7, (7, 5))
    assert not presets.compiles("t4-16gb", t4) and presets.plan(RunConfig(), "t4-16gb", t4).layout.kept == 0
    assert presets.compiles("4090-24gb", _hw("RTX 4090", 23.6)) and not presets.compiles("t4-16gb")


@pytest.mark.parametrize("preset, size, batch", [
    ("t4-16gb", (512, 768), 4), ("t4-16gb", (1024, 1024), 1), ("8-12gb", (1024, 1024), 1),
    ("8-12gb", (768, 768), 2), ("4090-24gb", (1536, 1536), 2), ("h100-80gb", (1536, 1536), 4)])
def test_bigger_images_trade_batch_for_accumulation(preset, size, batch):
    """Activation memory grows with the image tokens in a batch; the policy lowers the batch when it must."""
    hw = _hw(*GPUS[preset])
    cfg = presets.apply(RunConfig().replace(data={"width": size[0], "height": size[1]}), preset, hw)
    assert cfg.train.batch_size == batch and batch * cfg.train.gradient_accumulation_steps == 4
    assert presets.matching(cfg, hw) == preset


def test_a_new_run_is_planned_for_its_gpu_where_training_is_set_up(monkeypatch, tmp_path):
    """Opening a run plans nothing (the blog recipe's defaults); notebook 03's form applies this machine's preset
    (the CLI's train does the same, through presets.plan_if_unplanned), and a planned run keeps its plan."""
    from fluxnb.run import open_run

    monkeypatch.setattr(hardware, "cuda_info", lambda: GPUInfo("Tesla T4", (7, 5), 15.6))
    monkeypatch.delenv("FLUXNB_PROFILE", raising=False)
    run = open_run(tmp_path / "run", verbose=False)
    assert run.hw.dtype == torch.float16 and presets.unplanned(run.config)
    assert run.config.train.memory_budget_gib == 0.0 and run.config.train.batch_size == 1  # the blog's 1 x 4
    form = training_form(run.config, run.hw)
    assert form.children[0].value == "t4-16gb" and presets.matching(run.config, run.hw) == "t4-16gb"
    assert run.config.model.quantization == "nf4" and run.config.train.memory_budget_gib == 14.7
    assert not presets.unplanned(run.config) and presets.plan_if_unplanned(run.config, run.hw) is None
    run.config.train.learning_rate = 5e-5  # a user's edit after planning: the form leaves it alone
    training_form(run.config, run.hw)
    assert run.config.train.learning_rate == 5e-5


def test_a_config_no_preset_matches_is_custom():
    assert presets.matching(RunConfig().replace(train={"optimizer": "adamw"}), _hw("RTX 4090", 23.6)) == "custom"


def test_form_applies_a_preset_and_edits_the_config():
    import ipywidgets as W

    hw = _hw("H100", 79.2)
    cfg = presets.apply(RunConfig(), "4090-24gb", hw)
    form = training_form(cfg, hw)
    chooser, note = form.children[0], form.children[1]
    assert chooser.value == "4090-24gb" and "blocks keep them" in note.value  # the plan's table, with reasons
    chooser.value = "h100-80gb"  # 79.2 GiB: every block resident, none recomputed
    assert cfg.model.offload_blocks == 0 and cfg.train.keep_activations == 57
    assert "all 57 blocks keep them (nothing recomputed)" in note.value
    forms = form.children[2].children
    rank = next(w for w in forms[0].children if isinstance(w, W.IntText) and w.description == "rank")
    rank.value = 8
    assert cfg.lora.rank == 8
    labels = {w.description for f in forms for w in f.children if hasattr(w, "description")}
    assert {"learning rate", "max train steps", "gradient accumulation steps", "sample every", "checkpoint every",
            "width", "height", "alpha", "targets"} <= labels


def _notebook_03_table() -> dict[str, str]:
    """Notebook 03's markdown table of the presets: preset name -> its "layout at 512x768" cell."""
    import json
    import re
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "03_qlora_train.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    return {m[1]: m[2] for m in re.finditer(r"^\| `([\w-]+)` \| [^|]+ \| ([^|]+) \|", text, re.M)}


def _claims(layout: str) -> dict[str, int]:
    """What a layout cell says, as numbers: batch, blocks streamed, blocks keeping their activations (of 57)."""
    import re

    said = {"batch": int(re.search(r"batch (\d+)", layout)[1])}
    said |= {"streamed": 57} if "every block streamed" in layout else {"streamed": 0} if "resident" in layout else {}
    if m := re.search(r"(\d+) of 57 recomputed", layout):
        said["kept"] = 57 - int(m[1])
    elif m := re.search(r"last (\d+) (?:blocks )?keep", layout):
        said["kept"] = int(m[1])
    elif "nothing recomputed" in layout or "recomputed" in layout:
        said["kept"] = 57 if "nothing recomputed" in layout else 0
    return said


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_notebook_03_table_says_what_the_policy_plans_at_512x768(name):
    """Issue 26.7: the table said the 8-12gb preset streams and recomputes every block; the policy keeps one."""
    layout, plan = _notebook_03_table()[name], presets.plan(RunConfig(profile="real"), name)
    lay = plan.layout
    assert _claims(layout) == {"batch": lay.batch, "streamed": lay.streamed, "kept": lay.kept}, layout


def test_the_form_names_the_size_it_planned_for():
    """The form plans for the run's own images: on the tiny profile's 64x96 the 8-12gb budget gets another layout
    than the notebook's 512x768 table, and the table's head says so."""
    from fluxnb.nb.forms import plan_table

    cfg = RunConfig(profile="real").replace(data={"width": 64, "height": 96})
    assert "<th>budget 6 GiB, planned for 64x96 images</th>" in plan_table(cfg, "8-12gb", _hw("RTX 3060", 12.0))


def test_the_form_shows_issue_28s_options_and_warns_when_lr_does_not_fit_the_optimizer():
    import ipywidgets as W

    hw = _hw("RTX 4090", 23.6)
    cfg = presets.apply(RunConfig(), "4090-24gb", hw)
    form = training_form(cfg, hw)
    chooser, note = form.children[0], form.children[1]
    training, base_form = form.children[2].children[1], form.children[2].children[3]
    fields = {w.description: w for w in training.children if isinstance(w, W.ValueWidget)
              and not isinstance(w, W.HTML)}
    warning = training.children[-1]
    assert warning.value == "" and "Base model: FLUX.1-dev." in note.value
    fields["optimizer"].value = "prodigy"  # with Adam's 1e-4: 10000x below Prodigy's own step size
    assert cfg.train.optimizer == "prodigy" and "set learning_rate to 1.0" in warning.value
    assert "<td>optimizer</td><td><b>prodigy</b></td>" in note.value  # the plan table says what will run
    fields["learning rate"].value = 1.0
    assert cfg.train.learning_rate == 1.0 and warning.value == ""
    fields["caption dropout"].value = 0.1
    fields["weighting scheme"].value = "flux_shift"
    fields["sigmoid scale"].value = 1.5
    assert (cfg.train.caption_dropout, cfg.train.weighting_scheme, cfg.train.sigmoid_scale) == (0.1, "flux_shift", 1.5)
    assert presets.matching(cfg, hw) == "4090-24gb"  # none of them is the preset's business
    base_form.children[1].value = "FLUX.1-Krea-dev"
    assert cfg.model.model_id == "black-forest-labs/FLUX.1-Krea-dev"
    assert "Base model: FLUX.1-Krea-dev (FLUX.1-dev&#x27;s architecture: the same memory and time)" in note.value
    chooser.value = "h100-80gb"  # another preset keeps the method and the base
    assert (cfg.train.optimizer, cfg.model.base, cfg.train.caption_dropout) == ("prodigy", "FLUX.1-Krea-dev", 0.1)


def test_a_preset_picks_adams_flavour_but_keeps_prodigy():
    hw = _hw("RTX 4090", 23.6)
    assert presets.apply(RunConfig(), "h100-80gb", hw).train.optimizer == "adamw"
    prodigy = RunConfig().replace(train={"optimizer": "prodigy", "learning_rate": 1.0})
    assert presets.apply(prodigy, "8-12gb", hw).train.optimizer == "prodigy"
