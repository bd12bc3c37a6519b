"""Inference with the LoRA in a stock FluxPipeline (load, scale, blend, grids) and the merge + re-quantize path."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import psutil
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lora_helpers import make_lora
from PIL import Image
from safetensors.torch import load_file

from fluxnb.config import RunConfig
from fluxnb.data.embeddings import embedding_path
from fluxnb.data.store import caption_id, fingerprint
from fluxnb.base.errors import FluxnbError
from fluxnb.base.files import save_tensors
from fluxnb.run.hardware import GPUInfo, Hardware
from fluxnb.infer import merge, sampling
from fluxnb.run import Run, RunDir, open_run
from model_helpers import denoise

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory) -> Run:
    run = open_run(tmp_path_factory.mktemp("run"), profile="tiny", verbose=False)
    make_lora(run.config.model.model_id, run.dir.lora, alpha=4.0)
    return run


@pytest.fixture(scope="module")
def pipe(run):
    pipe = sampling.load_pipeline(run)
    pipe.set_progress_bar_config(disable=True)
    sampling.load_lora(pipe, run.dir.lora / LORA)
    return pipe


@pytest.fixture
def settings(run) -> sampling.SampleSettings:
    return dataclass_replace(sampling.default_settings(run), steps=2)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_default_settings_follow_the_run(run):
    s = sampling.default_settings(run)
    assert (s.width, s.height, s.steps) == (64, 96, run.config.train.sample_steps)
    assert s.prompt == run.config.data.validation_prompts[0]
    with pytest.raises(FluxnbError, match="multiple of 16"):
        dataclass_replace(s, width=50)
    with pytest.raises(FluxnbError, match="prompt is empty"):
        dataclass_replace(s, prompt=" ")


def test_lora_scale_zero_is_the_base_model(pipe, settings):
    prompts = [settings.prompt]
    pipe.disable_lora()
    base = pixels(sampling.generate(pipe, prompts, settings))
    pipe.enable_lora()
    sampling.set_scale(pipe, 1.0)
    styled = pixels(sampling.generate(pipe, prompts, settings))
    sampling.set_scale(pipe, 0.0)
    zero = pixels(sampling.generate(pipe, prompts, settings))
    assert np.abs(styled - base).mean() > 1.0  # the adapter changes the image ...
    assert np.array_equal(zero, base)  # ... and at scale 0 adds exactly nothing
    sampling.set_scale(pipe, 0.5)  # the scale reaches every layer as scale * alpha / r
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["lora"] == 0.5 * 4.0 / 4


def test_blend_two_adapters(pipe, run, settings, tmp_path):
    other = make_lora(run.config.model.model_id, tmp_path, seed=1, targets=["to_q", "to_v"], alpha=8.0)
    sampling.load_lora(pipe, other, "b")
    try:
        sampling.blend(pipe, {"lora": 0.7, "b": 0.3})
        layer = pipe.transformer.transformer_blocks[0].attn.to_q
        assert layer.scaling["lora"] == pytest.approx(0.7) and layer.scaling["b"] == pytest.approx(0.3 * 8 / 4)
        mixed = pixels(sampling.generate(pipe, [settings.prompt], settings))
        sampling.blend(pipe, {"lora": 1.0, "b": 0.0})
        only_a = pixels(sampling.generate(pipe, [settings.prompt], settings))
        sampling.set_scale(pipe, 1.0)
        assert np.array_equal(only_a, pixels(sampling.generate(pipe, [settings.prompt], settings)))
        assert np.abs(mixed - only_a).mean() > 1.0
        with pytest.raises(FluxnbError, match="not loaded"):
            sampling.blend(pipe, {"lora": 1.0, "nope": 1.0})
    finally:
        pipe.delete_adapters("b")


def test_base_vs_lora_grid_and_gallery(pipe, run, settings):
    prompts = run.config.data.validation_prompts[:2]
    base, styled = sampling.base_vs_lora(pipe, prompts, settings)
    assert [im.size for im in base + styled] == [(64, 96)] * 4
    assert np.abs(pixels(base) - pixels(styled)).mean() > 1.0
    grid = run.dir.images / "base_vs_lora.png"
    sampling.save_grid(grid, prompts, base, styled)
    assert Image.open(grid).size[0] > 2 * 64
    folder = sampling.save_images(run.dir.images / "final", prompts, styled, settings)
    rows = json.loads((folder / "prompts.json").read_text())
    assert [r["prompt"] for r in rows] == prompts and rows[0]["seed"] == settings.seed
    assert np.array_equal(pixels([Image.open(folder / rows[1]["file"])]), pixels(styled[1:]))


def test_pipeline_without_text_encoders_gives_the_same_images(pipe, run, settings, monkeypatch):
    """The T4 route: no T5/CLIP in the pipeline; prompts are encoded separately (or read from the run's cache)."""
    import fluxnb.data.embeddings

    prompts = run.config.data.validation_prompts[:2]
    sampling.set_scale(pipe, 1.0)
    want = pixels(sampling.generate(pipe, prompts, settings, run))
    lean = sampling.load_pipeline(run, sampling.Plan(False, False, False, "test"))
    lean.set_progress_bar_config(disable=True)
    sampling.load_lora(lean, run.dir.lora / LORA)
    assert lean.text_encoder is None and lean.text_encoder_2 is None
    assert np.abs(pixels(sampling.generate(lean, prompts, settings, run)) - want).max() <= 1
    assert sampling.encode_prompts(run, prompts) == 0  # encoded once above, now in the run's cache
    # cached embeddings are used as they are, without loading any encoder
    tag = fingerprint(fluxnb.data.embeddings.settings(run.config))
    for p in prompts:
        zeros = {"prompt_embeds": torch.zeros(77, 32), "pooled_prompt_embeds": torch.zeros(32), "text_ids": torch.zeros(77, 3)}
        save_tensors(embedding_path(run.dir, p), zeros, metadata={"id": caption_id(p), "settings": tag})
    monkeypatch.setattr(fluxnb.data.embeddings, "load_text_encoders", lambda *a: pytest.fail("encoders were loaded"))
    assert np.abs(pixels(sampling.generate(lean, prompts, settings, run)) - want).mean() > 1.0
    for p in prompts:
        embedding_path(run.dir, p).unlink()


def _gpu_run(tmp_path, name, gib, capability):
    hw = Hardware("real", torch.device("cuda"), torch.float16, GPUInfo(name, capability, gib), "test")
    return Run(RunDir(tmp_path), RunConfig(profile="real"), hw)


def test_plan_fits_each_gpu(tmp_path):
    plans = {name: (lambda p: (p.quantize, p.offload, p.text_encoders))(sampling.plan_pipeline(_gpu_run(tmp_path, name, gib, cap)))
             for name, gib, cap in [("T4", 15.0, (7, 5)), ("4090", 24.0, (8, 9)), ("H100", 80.0, (9, 0)),
                                    ("3060 Ti", 8.0, (8, 6))]}
    assert plans["H100"] == (False, False, True)  # 34 GB in 16-bit fits
    assert plans["4090"] == (True, False, True)  # NF4 transformer + encoders: 17 GB
    assert plans["T4"] == (True, False, False)  # no room for T5 next to it: prompts encoded apart
    assert plans["3060 Ti"] == (True, True, False)


def _out(transformer) -> torch.Tensor:
    return denoise(transformer, timestep=0.6)


@pytest.fixture(scope="module")
def unfused(run):
    """(base output, output with the LoRA unfused), fp32, and the base weights."""
    transformer = FluxTransformer2DModel.from_pretrained(run.config.model.model_id, subfolder="transformer")
    base_weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    sampling.load_lora(pipe, run.dir.lora / LORA)
    with_lora = _out(transformer)
    pipe.disable_lora()
    return _out(transformer), with_lora, base_weights


def test_fused_matches_unfused(run, unfused):
    """fp32 throughout: fused (W + s B A) x and unfused W x + s B (A x) differ only by rounding of reordered sums,
    ~1e-7 per layer; 1e-5 of the output's scale leaves room for 3 blocks. The LoRA itself moves the output by
    more than 1e-2 of that scale, so the test cannot pass by both being the base model."""
    base, with_lora, _ = unfused
    merge.fuse_to_disk(run, run.dir.lora / LORA)
    fused = _out(merge.load_merged(run, quantize=False))
    scale = with_lora.abs().max()
    assert (with_lora - base).abs().max() > 1e-2 * scale
    assert (fused - with_lora).abs().max() < 1e-5 * scale
    info = json.loads((run.dir.merged / "transformer" / "merge.json").read_text())
    assert info["lora"] == LORA and info["lora_scale"] == 1.0


def test_merge_fuses_in_full_precision_then_requantizes(run, unfused):
    """The run is configured for NF4, yet the fused weights on disk are exactly W + s B A in fp32 (no 4-bit
    rounding before the fuse), and the reload quantizes them once: its NF4 codes are those of NF4(W + s B A),
    not those of fusing into 4-bit weights, NF4(dequant(NF4(W)) + s B A)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from fluxnb.model.quant import quantize_nf4_

    _, _, base_weights = unfused
    assert run.config.model.quantization == "nf4"
    folder = merge.fuse_to_disk(run, run.dir.lora / LORA)
    fused = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    lora = load_file(run.dir.lora / LORA)
    name = "transformer_blocks.0.attn.to_q"
    delta = lora[f"transformer.{name}.lora_B.weight"] @ lora[f"transformer.{name}.lora_A.weight"]  # alpha / r = 1
    want = base_weights[f"{name}.weight"] + delta
    assert torch.allclose(fused[f"{name}.weight"], want, rtol=0, atol=1e-6 * want.abs().max())

    layer = merge.load_merged(run).transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear4bit)
    nf4 = lambda w: F.dequantize_4bit(*F.quantize_4bit(w, blocksize=layer.weight.quant_state.blocksize, quant_type="nf4"))
    got = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(got, nf4(want))  # quantized once, from the exact fused weights
    assert not torch.equal(got, nf4(nf4(base_weights[f"{name}.weight"]) + delta))  # what a 4-bit fuse would give
    with pytest.raises(FluxnbError, match="quantized"):
        merge.fuse_into(quantize_nf4_(FluxTransformer2DModel.from_pretrained(
            run.config.model.model_id, subfolder="transformer"), torch.float32), run.dir.lora / LORA)


def test_merge_refuses_without_enough_ram_before_loading(run, monkeypatch):
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1024))  # one shard of the tiny transformer: ~0.5 MB
    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded anyway"))
    with pytest.raises(FluxnbError, match="merging needs"):
        merge.fuse_to_disk(run, run.dir.lora / LORA)


def test_small_gpu_plan_streams_the_blocks_and_gives_the_same_images(run, settings):
    """The < 12 GiB plan (an 8 GB card): the NF4 transformer's blocks stream from CPU RAM while the pipeline
    runs. The resident NF4 pipeline's images exactly, with the LoRA loaded after streaming started; memory.free
    drops the CPU copies too (the streamer's hooks and arena go, not only the parameters)."""
    from fluxnb.base import memory
    from fluxnb.model.offload import streamer_of

    prompts = run.config.data.validation_prompts[:2]
    resident = sampling.load_pipeline(run, sampling.Plan(True, False, False, "test"))
    resident.set_progress_bar_config(disable=True)
    sampling.load_lora(resident, run.dir.lora / LORA)
    want = pixels(sampling.generate(resident, prompts, settings, run))
    memory.free(resident)
    small = sampling.load_pipeline(run, sampling.Plan(True, True, False, "test"))
    small.set_progress_bar_config(disable=True)
    streamer = streamer_of(small.transformer)
    assert streamer is not None and len(streamer.parts) == len(small.transformer.transformer_blocks) + len(
        small.transformer.single_transformer_blocks)
    sampling.load_lora(small, run.dir.lora / LORA)
    assert np.array_equal(pixels(sampling.generate(small, prompts, settings, run)), want)
    assert all(not part.loaded for part in streamer.parts.values())  # released behind itself
    memory.free(small)
    assert small.transformer is None or streamer_of(small.transformer) is None
    assert streamer.arena is None and not streamer.parts and not streamer._handles
