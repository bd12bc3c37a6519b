"""ComfyUI/kohya export: key names, fused q/k/v layout, and round trips through diffusers' own reader."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from lora_helpers import make_lora, save_random_lora, wide_transformer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxnb.cli import main
from fluxnb.base.errors import FluxnbError
from fluxnb.infer.export import (
    FLUX_DEV_LINEAR1_ROWS,
    LoraPair,
    check_round_trip,
    export_lora,
    export_path,
    read_lora,
    to_comfyui,
)
from fluxnb.run import open_run
from fluxnb.share.hub import HubSettings, stage

DOUBLE_ONLY = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"  # peft full-matches: skips single_...


def _flux_dev_lora(folder, *, r=4, alpha=6.0) -> tuple:
    """A diffusers LoRA file at FLUX.1-dev's widths (tensors only, no model): one double and two single blocks,
    odd modules included, alpha/r = 1.5 (not a power of two), and one module of another rank and alpha."""
    gen, d, layers = torch.Generator().manual_seed(0), 3072, {}
    shapes = {f"transformer_blocks.0.attn.{m}": (d, d) for m in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out")}
    shapes |= {f"single_transformer_blocks.0.attn.{m}": (d, d) for m in ("to_q", "to_k", "to_v")}
    shapes |= {"single_transformer_blocks.1.attn.to_k": (d, d), "single_transformer_blocks.1.proj_mlp": (4 * d, d),
               "transformer_blocks.0.norm1.linear": (6 * d, d)}
    ranks = {name: (2 if name.endswith("1.attn.to_k") else r) for name in shapes}
    for name, (out, inp) in shapes.items():
        layers[f"{name}.lora_A.weight"] = torch.randn(ranks[name], inp, generator=gen) / inp**0.5
        layers[f"{name}.lora_B.weight"] = torch.randn(out, ranks[name], generator=gen)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(shapes),
            "rank_pattern": {"single_transformer_blocks.1.attn.to_k": 2},
            "alpha_pattern": {"single_transformer_blocks.1.attn.to_k": 5.0}}
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    return folder / "pytorch_lora_weights.safetensors", shapes


def test_read_lora_gives_peft_scales(tmp_path):
    path, _ = _flux_dev_lora(tmp_path)
    pairs = read_lora(path)
    assert pairs["transformer_blocks.0.attn.to_q"].scale == 1.5  # alpha / r from the file's metadata
    assert pairs["single_transformer_blocks.1.attn.to_k"].scale == 2.5  # rank_pattern 2, alpha_pattern 5
    assert pairs["single_transformer_blocks.1.attn.to_k"].rank == 2


def test_comfyui_keys_fuse_qkv_with_scaled_alpha(tmp_path):
    path, _ = _flux_dev_lora(tmp_path)
    state = to_comfyui(read_lora(path))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape == (12, 3072)  # q, k, v rows of A stacked: rank 3r
    up = state[f"{qkv}.lora_up.weight"]
    assert up.shape == (3 * 3072, 12) and float(state[f"{qkv}.alpha"]) == 3 * 6.0  # alpha/R stays alpha/r
    assert up[:3072, 4:].abs().max() == 0 and up[3072:6144, :4].abs().max() == 0  # B block-diagonal
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (FLUX_DEV_LINEAR1_ROWS, 16)
    assert float(state["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 6.0
    assert {k.split(".")[0] for k in state} == {
        qkv, "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_mod_lin",
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear1"}


def test_round_trip_delta_w_at_flux_dev_widths(tmp_path):
    """Every module's B @ A * scale survives export -> diffusers' kohya reader, ranks and alphas included."""
    path, shapes = _flux_dev_lora(tmp_path)
    out = export_lora(path, "comfyui", tmp_path / "x_comfyui.safetensors")
    result = check_round_trip(path, out)
    assert result.checked == len(shapes) and not result.unchecked
    assert result.max_error < 1e-6  # fp32: one rounding of A * alpha/r
    assert result.zero_extras == 5  # zero blocks: add_q, add_v; single 0 proj_mlp; single 1 to_q, to_v
    # diffusers recognised the block-diagonal layout and split it into rank-r pieces (not rank-4r copies)
    assert read_lora(out)["single_transformer_blocks.0.attn.to_q"].rank == 4
    # and the check can fail: one changed number in the exported file is caught
    state = load_file(out)
    state["lora_unet_single_blocks_0_linear1.lora_up.weight"][5, 0] += 1.0
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(FluxnbError, match="does not read back"):
        check_round_trip(path, tmp_path / "bad.safetensors")


def _image(pipe, seed=0):
    """The denoised latents (before the VAE, which would only blur differences): (1, N, 64)."""
    return pipe("a cat sleeping on a blue chair, tnyst style", num_inference_steps=2, width=64, height=96,
                guidance_scale=3.5, max_sequence_length=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images.numpy()


def _same_image_both_files(pipe, lora, comfy):
    base = _image(pipe)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="diffusers")
    with_diffusers = _image(pipe)
    pipe.delete_adapters("diffusers")
    pipe.load_lora_weights(str(comfy.parent), weight_name=comfy.name, adapter_name="comfyui")
    with_comfyui = _image(pipe)
    scale = np.abs(base).max()
    effect, diff = np.abs(with_diffusers - base).max() / scale, np.abs(with_comfyui - with_diffusers).max() / scale
    print(f"LoRA effect {effect:.2e}, export difference {diff:.2e} (relative to max |latent|)")
    # fp32 throughout: the two files differ only by where alpha / r is multiplied in (one rounding per layer)
    assert diff < 1e-5, f"the exported LoRA gives another image (relative difference {diff:.1e})"
    assert effect > 100 * 1e-5, "the LoRA must change the image far more than the tolerance, or this proves nothing"


def test_exported_file_gives_same_image_in_tiny_pipeline(tiny_assets, tmp_path):
    """Double-block attention only: diffusers cannot read kohya single blocks at the tiny model's widths."""
    lora = make_lora(tiny_assets.model, tmp_path, targets=DOUBLE_ONLY, alpha=6.0)  # alpha/r = 1.5
    comfy = export_lora(lora, "comfyui", tmp_path / "tiny_comfyui.safetensors")
    pipe = FluxPipeline.from_pretrained(tiny_assets.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    _same_image_both_files(pipe, lora, comfy)


def test_exported_single_block_gives_same_image_at_flux_dev_width(tiny_assets, tmp_path):
    """Single block at FLUX.1-dev's width inside the tiny pipeline: the fused linear1 layout loads back exactly."""
    transformer = wide_transformer()
    lora = save_random_lora(transformer, tmp_path, alpha=6.0)
    transformer.delete_adapters("default")
    comfy = export_lora(lora, "comfyui", tmp_path / "wide_comfyui.safetensors")
    pipe = FluxPipeline.from_pretrained(tiny_assets.model, transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    _same_image_both_files(pipe, lora, comfy)


def test_round_trip_on_tiny_model_says_what_it_cannot_check(tiny_assets, tmp_path):
    lora = make_lora(tiny_assets.model, tmp_path)  # attention preset: double and single blocks
    result = check_round_trip(lora, export_lora(lora, "comfyui", tmp_path / "t_comfyui.safetensors"))
    assert result.checked == 4  # double block: to_q, to_k, to_v, to_out.0
    (why, modules), = result.unchecked.items()
    assert "FLUX.1-dev" in why and len(modules) == 6  # 2 single blocks x q, k, v
    assert "not checked" in str(result)
    assert all(len(line) <= 200 for line in str(result).splitlines())  # a line per finding (was one of 385 chars)


def test_unknown_module_is_refused():
    pair = LoraPair(torch.zeros(4, 8), torch.zeros(8, 4), 1.0)
    with pytest.raises(FluxnbError, match="no counterpart"):
        to_comfyui({"pos_embed.proj": pair})


def test_cli_export_both_formats(tiny_assets, tmp_path, capsys):
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    lora = make_lora(tiny_assets.model, run.dir.lora)
    assert main(["export", "--run-dir", str(run.path), "--format", "comfyui"]) == 0
    comfy = export_path(run.dir, "comfyui")
    assert comfy.name == "run_comfyui.safetensors" and "modules match" in capsys.readouterr().out
    with safe_open(str(comfy), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_flux"
    assert main(["export", "--run-dir", str(run.path), "--format", "diffusers"]) == 0
    assert export_path(run.dir, "diffusers").read_bytes() == lora.read_bytes()
    assert main(["export", "--run-dir", str(tmp_path / "nowhere")]) == 2


# The module names kohya's FLUX LoRA creates (sd-scripts, networks/lora_flux.py: every Linear inside the double and
# single blocks, plus the input embedders), which its strict loader (flux_minimal_inference) accepts.
KOHYA_SLOTS = re.compile(r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
                         r"|single_blocks_\d+_(linear1|linear2|modulation_lin)|img_in|txt_in"
                         r"|(time|vector|guidance)_in_(in|out)_layer)")


def test_all_linear_export_holds_only_what_kohya_loads_and_names_what_it_left_out(tiny_assets, tmp_path, capsys):
    """Issue 26.8: kohya's inference refused an all-linear export ("Unexpected key(s) ... lora_unet_final_layer_*")."""
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    lora = make_lora(tiny_assets.model, run.dir.lora, targets="all-linear")
    assert {"proj_out", "norm_out.linear"} <= set(read_lora(lora))  # peft's all-linear adapts the final layer
    assert main(["export", "--run-dir", str(run.path)]) == 0
    out = capsys.readouterr().out
    modules = {key.split(".")[0] for key in load_file(export_path(run.dir, "comfyui"))}
    assert modules and not [m for m in modules if not KOHYA_SLOTS.fullmatch(m)]
    assert "lora_unet_img_in" in modules and "lora_unet_double_blocks_0_img_mod_lin" in modules
    said = [line for line in out.splitlines() if "left out" in line]
    assert len(said) == 1 and "norm_out.linear, proj_out" in said[0] and "diffusers file keeps them" in said[0]
    staged = stage(run, HubSettings(repo_id="tiny-lora"))  # the Hub's copy and its card say so too
    assert any("left out" in note for note in staged.notes) and "leaves out the LoRA on FLUX's final layer" in staged.card
