"""The ComfyUI file of a DoRA or a LoKr (fluxnb.infer.lycoris), held against ComfyUI's own rules (tests/comfyui_keys.py):
every key is one ComfyUI maps and reads, and the weights it computes from them are peft's merged weights. The
plain LoRA's kohya file is tests/test_export.py's and does not change."""

from __future__ import annotations

import pytest
from comfyui_keys import SWAPPED, key_map, patched, unread
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import peft_merged, random_adapter

from fluxnb.base.errors import FluxnbError
from fluxnb.cli import main
from fluxnb.config import LoRAConfig
from fluxnb.infer.export import check_round_trip, export_lora, export_path
from fluxnb.model.lora import read_adapter
from fluxnb.run import open_run
from fluxnb.share.hub import HubSettings, stage


@pytest.fixture(scope="module", params=["dora", "lokr"])
def adapted(request, tiny_assets, tmp_path_factory):
    """A random adapter of each type on every Linear of the tiny FLUX (double and single blocks, the embedders, the
    final layer and its swapped modulation), its file, the base weights and peft's merged ones."""
    folder = tmp_path_factory.mktemp(request.param)
    transformer = FluxTransformer2DModel.from_pretrained(tiny_assets.model, subfolder="transformer")
    base = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    # rank 4 keeps LoKr's w2 whole in the 32-wide layers and makes it a product in the 128-wide ones: both paths
    path = random_adapter(transformer, folder, LoRAConfig(type=request.param, rank=4, alpha=6.0, targets="all-linear"))
    return request.param, path, base, peft_merged(transformer), folder


def test_comfyui_maps_and_reads_every_key(adapted):
    kind, path, base, _, folder = adapted
    state = load_file(export_lora(path, "comfyui", folder / "x_comfyui.safetensors"))
    prefixes = key_map(double=1, single=2)
    heads = {k.split(".")[0] for k in state}
    assert heads <= set(prefixes), sorted(heads - set(prefixes))[:3]
    assert not unread(state, prefixes)  # nothing ComfyUI would log as "lora key not loaded"
    modules = read_adapter(path).modules
    assert sorted(prefixes[h] for h in heads) == sorted(modules) and len(modules) == 36  # every Linear of the model
    assert {SWAPPED, "proj_out", "single_transformer_blocks.1.proj_mlp", "x_embedder"} <= set(modules)
    with safe_open(str(folder / "x_comfyui.safetensors"), "pt") as f:
        assert f.metadata()["fluxnb_adapter"] == kind


def test_comfyui_reads_every_key_of_the_plain_loras_kohya_file_too(tiny_assets, tmp_path):
    """The same rules hold the LoRA's kohya/BFL file (tests/test_export.py checks its numbers through diffusers)."""
    transformer = FluxTransformer2DModel.from_pretrained(tiny_assets.model, subfolder="transformer")
    path = random_adapter(transformer, tmp_path, LoRAConfig(targets="all-linear"))
    state = load_file(export_lora(path, "comfyui", tmp_path / "k_comfyui.safetensors"))
    prefixes = key_map(double=1, single=2)
    assert {k.split(".")[0] for k in state} <= set(prefixes) and not unread(state, prefixes)
    assert any(k.startswith("lora_unet_single_blocks_1_linear1.") for k in state)


def test_comfyuis_weights_are_peft_merged_weights(adapted):
    """LoKr: exactly. DoRA: exactly with the norm DoRA defines, ||W + dW||; ComfyUI today divides by ||W|| (see
    fluxnb.infer.lycoris), which scales each row of peft's result by ||W + dW|| / ||W||, and by nothing else."""
    kind, path, base, merged, folder = adapted
    state = load_file(export_lora(path, "comfyui", folder / "y_comfyui.safetensors"))
    prefixes = key_map(double=1, single=2)
    for head in {k.split(".")[0] for k in state}:
        module = prefixes[head]
        tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".")[0] == head}
        w, want = base[f"{module}.weight"], merged[f"{module}.weight"].double()
        got = patched(w, tensors, swapped=module == SWAPPED, dora_norm_of_update=True)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6, module
        if kind == "dora":
            today = patched(w, tensors, swapped=module == SWAPPED)
            update = tensors["alpha"].item() / tensors["lora_down.weight"].shape[0] * (
                tensors["lora_up.weight"].double() @ tensors["lora_down.weight"].double())
            ratio = (w.double() + update).norm(dim=1) / w.double().norm(dim=1)  # diffusers' row order
            assert float((today - want * ratio[:, None]).abs().max() / today.abs().max()) < 1e-6, module


def test_round_trip_check_passes_and_catches_a_changed_number(adapted):
    kind, path, _, _, folder = adapted
    out = export_lora(path, "comfyui", folder / "z_comfyui.safetensors")
    result = check_round_trip(path, out)
    assert result.checked == 36 and result.max_error < 1e-6 and "36 modules match" in str(result)
    state = load_file(out)
    name = next(k for k in state if k.endswith("lokr_w1" if kind == "lokr" else "dora_scale"))
    state[name] = state[name] * 1.01
    save_file(state, folder / "bad.safetensors")
    with pytest.raises(FluxnbError, match="does not read back"):
        check_round_trip(path, folder / "bad.safetensors")
    assert export_lora(path, "diffusers", folder / "copy.safetensors").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_cli_export_and_the_hub_stage_of_a_dora_or_lokr_run(tiny_assets, tmp_path, capsys, kind):
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    run.config = run.config.replace(lora={"type": kind})
    run.save()
    random_adapter(FluxTransformer2DModel.from_pretrained(tiny_assets.model, subfolder="transformer"), run.dir.lora,
                   LoRAConfig(type=kind))
    assert main(["export", "--run-dir", str(run.path), "--format", "comfyui"]) == 0
    assert "modules match" in capsys.readouterr().out and export_path(run.dir, "comfyui").is_file()
    staged = stage(run, HubSettings(repo_id="tiny-lora"))
    assert f"same {dict(dora='DoRA', lokr='LoKr')[kind]} in LyCORIS's layout" in staged.card and f"| adapter | {kind} |" in staged.card
    assert ("load_lora_adapter" in staged.card) == (kind == "lokr") and not any("left out" in n for n in staged.notes)
