"""The streaming merge: base shards read one tensor at a time, fused with the LoRA, written as NF4 (on a GPU) or
16-bit, so that merge + requantize fits a free Colab's RAM. On the tiny model, CPU, fp32."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lora_helpers import make_lora

from fluxnb.base import memory
from fluxnb.base.errors import FluxnbError
from fluxnb.infer import merge, sampling
from fluxnb.model import fp8, quant
from fluxnb.model.quant import _linear4bit_modules, quantize_nf4_
from fluxnb.run import open_run
from model_helpers import denoise

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    run = open_run(tmp_path_factory.mktemp("run"), profile="tiny", verbose=False)
    make_lora(run.config.model.model_id, run.dir.lora, alpha=8.0)  # alpha / r = 2: the scaling must be read
    return run


def _out(transformer) -> torch.Tensor:
    return denoise(transformer, timestep=0.5)


def _base(run):
    return FluxTransformer2DModel.from_pretrained(run.config.model.model_id, subfolder="transformer")


@pytest.fixture(scope="module")
def unfused_lora(run):
    """Output of the fp32 base with the LoRA unfused (stock diffusers), and the same fused by stock fuse_lora."""
    transformer = _base(run)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    sampling.load_lora(pipe, run.dir.lora / LORA)
    with_lora = _out(transformer)
    return with_lora, merge.fuse_into(_base(run), run.dir.lora / LORA)


def test_streamed_nf4_merge_is_nf4_of_the_fused_weights(run, unfused_lora, tmp_path):
    """NF4 written tensor by tensor == NF4 quantizing of stock diffusers' fused model: the same 4-bit codes and
    the same absmax of every layer, bit for bit, so the same output. (Not a comparison of NF4's rounding with the
    LoRA's effect: on the 32-wide tiny model the two are about equal, and which is larger moved with the library
    versions of a fresh install, issue 23.)"""
    _, fused = unfused_lora
    folder = merge.fuse_to_disk(run, run.dir.lora / LORA, out=tmp_path, quantize=True)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    streamed = merge.load_merged(run, tmp_path)
    reference = quantize_nf4_(copy.deepcopy(fused), torch.float32)  # in place: keep the fixture 16-bit
    layers = dict(_linear4bit_modules(reference))
    assert layers and set(layers) == {name for name, _ in _linear4bit_modules(streamed)}
    for name, layer in _linear4bit_modules(streamed):
        want = layers[name].weight
        assert torch.equal(layer.weight.data, want.data), name  # the 4-bit codes
        assert torch.equal(layer.weight.quant_state.absmax, want.quant_state.absmax), name
    got, want = _out(streamed), _out(reference)
    assert torch.equal(got, want)
    assert json.loads((tmp_path / "merge.json").read_text())["quantization"] == "nf4"


def test_streamed_merge_writes_shards_holding_one_at_a_time(run, unfused_lora, tmp_path, monkeypatch):
    """A shard limit far below the model gives many shards and an index that stock from_pretrained reads; the
    16-bit result equals stock fuse_lora's weights."""
    _, fused = unfused_lora
    monkeypatch.setattr(merge, "SHARD_GIB", 50_000 / memory.GiB)  # ~50 kB per shard
    folder = merge.fuse_to_disk(run, run.dir.lora / LORA, out=tmp_path, quantize=False)
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 5 and (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = merge.load_merged(run, tmp_path, quantize=False).state_dict()
    for key, value in fused.state_dict().items():
        assert torch.allclose(loaded[key], value, rtol=0, atol=1e-6 * value.abs().max().clamp(min=1)), key


def test_an_fp8_base_merges_in_16_bit_in_memory_and_streamed_from_its_folder(run, tmp_path):
    """fuse_into dequantizes an FP8 base (fluxnb.model.fp8) and folds the LoRA into those numbers; fuse_to_disk
    reading a save_fp8 folder as its base does the same tensor by tensor: the scales are folded into their
    weights, none is left in the 16-bit output, whose config carries no quantization."""
    fp8_model = quant.load_transformer(dataclasses.replace(run.config.model, quantization="fp8"), run.hw)
    quant.save_fp8(fp8_model, tmp_path / "base" / "transformer")
    deltas = merge.lora_deltas(run.dir.lora / LORA)
    name = sorted(deltas)[0]
    numbers = fp8_model.get_submodule(name).dequantize(torch.float32)
    fused = merge.fuse_into(fp8_model, run.dir.lora / LORA)
    assert not fp8.fp8_layers(fused) and fused.config.quantization_config is None
    a, b, scaling = deltas[name]
    torch.testing.assert_close(fused.get_submodule(name).weight, numbers + scaling * b @ a, rtol=0, atol=1e-6)
    fp8_run = dataclasses.replace(run, config=run.config.replace(model={"model_id": str(tmp_path / "base")}))
    folder = merge.fuse_to_disk(fp8_run, run.dir.lora / LORA, out=tmp_path / "out", quantize=False)
    assert "quantization_config" not in json.loads((folder / "transformer" / "config.json").read_text())
    streamed, want = merge.load_merged(fp8_run, folder, quantize=False).state_dict(), fused.state_dict()
    assert streamed.keys() == want.keys()  # no weight_scale left
    for key, value in want.items():
        assert torch.allclose(streamed[key], value, rtol=0, atol=1e-6 * value.abs().max().clamp(min=1)), key


def test_merge_refuses_when_the_disk_is_too_small(run, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge.shutil, "disk_usage", lambda path: usage(10, 10, 0))
    with pytest.raises(FluxnbError, match="of disk"):
        merge.fuse_to_disk(run, run.dir.lora / LORA)


def test_merge_honours_the_host_memory_limit(run, monkeypatch):
    """FLUXNB_HOST_MEMORY_GIB (an emulated small machine) is what the check sees, not the host's free RAM."""
    monkeypatch.setenv(memory.HOST_MEMORY_ENV, "0.1")
    assert "merging needs" in merge.memory_problem(run)
    monkeypatch.setenv(memory.HOST_MEMORY_ENV, "1000")
    assert merge.memory_problem(run) is None


def test_t4_merge_needs_a_shard_not_the_whole_base(run, monkeypatch):
    """FLUX.1-dev's 11.9 B transformer on a T4 envelope (11.5 GiB of RAM): the old check wanted 24.4 GiB."""
    monkeypatch.setattr(merge, "transformer_gib", lambda run, dtype=None, bits=None: 11.9e9 * (bits or 16) / 8 / memory.GiB)
    monkeypatch.setattr(merge, "available_ram_gib", lambda: 11.5 - 2.0)  # the kernel itself holds ~2 GiB
    assert merge.memory_problem(run, quantize=True) is None
    monkeypatch.setattr(merge, "available_ram_gib", lambda: 3.0)
    assert "merging needs 4.5 GiB" in merge.memory_problem(run, quantize=True)
