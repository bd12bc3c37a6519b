"""The streaming merge: base shards read one tensor at a time, fused with the LoRA, written as NF4 (on a GPU) or
16-bit, so that merge + requantize fits a free Colab's RAM. On the tiny model, CPU, fp32."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch
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
    assert json.loads((tmp_path / "transformer" / "merge.json").read_text())["quantization"] == "nf4"


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
    merges = merge.lora_merges(run.dir.lora / LORA)  # {module: its weight -> W + alpha / r * B @ A}
    name = sorted(merges)[0]
    numbers = fp8_model.get_submodule(name).dequantize(torch.float32)
    fused = merge.fuse_into(fp8_model, run.dir.lora / LORA)
    assert not fp8.fp8_layers(fused) and fused.config.quantization_config is None
    torch.testing.assert_close(fused.get_submodule(name).weight, merges[name](numbers.clone()), rtol=0, atol=1e-6)
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


# Never lose a run (issue 27.7): a merge killed at any instant leaves the earlier merge or the new one, never a mix.
class _Killed(BaseException):
    """A SIGKILL stand-in, raised where the disk holds exactly what a kill at that instant would leave."""


_CHANGES = [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (Path, "write_text"),
            (safetensors.torch, "save_file")]  # every way the merge changes the disk (shutil.rmtree included)


def _merge_killed_at(n: int | str, run, lora, out: Path, image: Path) -> bool:
    """Merge `lora` over the merge in `out`, stopped before its n-th change to the disk (or its first `n`, e.g.
    "save_file"); `image` gets a copy of `out` as it was at that instant, which is what a SIGKILL leaves (no
    cleanup runs). False: the merge made fewer changes."""
    count = 0
    with pytest.MonkeyPatch.context() as mp:
        def hook(real, name):
            def change(*args, **kwargs):
                nonlocal count
                count += 1
                if n in (count, name):
                    mp.undo()
                    shutil.copytree(out, image, symlinks=True)
                    raise _Killed
                return real(*args, **kwargs)
            return change

        for owner, name in _CHANGES:
            mp.setattr(owner, name, hook(getattr(owner, name), name))
        try:
            merge.fuse_to_disk(run, lora, out=out, quantize=False)
        except _Killed:
            return True
    return False


def _held(folder: Path) -> tuple[str, str] | None:
    """(sha256 of the weights, sha256 of the LoRA its merge.json names) of folder/transformer, None if it has no
    whole model; merge.json is read inside transformer/, or beside it where older fluxnb wrote it."""
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    info = next((p for p in (folder / "transformer" / "merge.json", folder / "merge.json") if p.is_file()), None)
    if not weights.is_file() or not (folder / "transformer" / "config.json").is_file():
        return None
    return hashlib.sha256(weights.read_bytes()).hexdigest(), info and json.loads(info.read_text())["lora_sha256"]


def test_a_merge_killed_at_any_point_leaves_the_old_or_the_new_merge_and_the_next_load_tidies(run, tmp_path, capsys):
    """A second merge over a first one, stopped before each of its changes to the disk in turn. At every point
    the folder holds the first merge (weights + its merge.json) or the second, or is between the two renames of
    the swap with the second one finished beside it; load_merged then finishes the swap, removes every temporary
    folder, and loads one of the two. (The old code left config.json without weights, new weights under the
    old LoRA's merge.json, and .transformer-* folders of a model's size.)"""
    first, second = run.dir.lora / LORA, make_lora(run.config.model.model_id, tmp_path / "second", seed=1)
    merges = {}
    for lora in (first, second):
        merges[lora] = _held(merge.fuse_to_disk(run, lora, out=tmp_path / lora.parent.name, quantize=False))
        assert merges[lora][1] == hashlib.sha256(lora.read_bytes()).hexdigest()
    points, gaps = 0, 0
    while True:
        out, image = tmp_path / "out", tmp_path / f"killed-{points}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp_path / first.parent.name, out)
        if not _merge_killed_at(points + 1, run, second, out, image):
            break
        points += 1
        held = _held(image)
        if held is None:  # only between the swap's two renames, with the second merge finished beside it
            gaps += 1
            beside = [_held_temp(t) for t in image.glob(".transformer-*") if not t.name.endswith(".old")]
            assert beside == [merges[second]], f"killed at change {points}: transformer/ holds no whole model " \
                f"({sorted(p.name for p in (image / 'transformer').glob('*'))}) and no finished merge waits beside it"
        else:
            assert held in merges.values(), f"killed at change {points}: weights and merge.json do not match"
        capsys.readouterr()
        merge.load_merged(run, image, quantize=False)
        said = capsys.readouterr().out.strip()
        assert _held(image) in merges.values() and (held is None or _held(image) == held)
        assert not list(image.glob(".transformer-*")), f"killed at change {points}: a temporary folder is left"
        assert len(said.splitlines()) <= 1, said
    assert points > 10 and gaps == 1  # every change of the swap was a kill point, the gap among them
    assert _held(out) == merges[second] and not list(out.glob(".*"))


def _held_temp(temp: Path) -> tuple[str, str] | None:
    view = temp.parent / "view"
    shutil.rmtree(view, ignore_errors=True)
    (view / "transformer").mkdir(parents=True)
    for f in temp.iterdir():
        shutil.copy(f, view / "transformer" / f.name)
    held = _held(view)
    shutil.rmtree(view)
    return held


def test_a_later_merge_removes_what_a_killed_one_left_and_only_that(run, tmp_path, capsys):
    """The .transformer-* folders a killed merge left (this fluxnb's, marked, and an older fluxnb's, by name and
    contents) go at the next merge, in one line; a folder of the user's that looks alike stays."""
    out = tmp_path / "merged"
    assert _merge_killed_at("save_file", run, run.dir.lora / LORA, out, tmp_path / "killed")  # a temporary left
    killed = tmp_path / "killed"
    assert [p.name for p in killed.glob(".transformer-*")] and not (killed / "transformer").exists()
    legacy = killed / ".transformer-k3j2h1g0"  # what older fluxnb left: no PID, no marker, only merge output
    legacy.mkdir()
    (legacy / "part-00000.safetensors").write_bytes(b"x" * 1000)
    theirs = killed / ".transformer-mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("a user's folder")
    past = time.time() - 3600
    os.utime(legacy, (past, past))
    capsys.readouterr()
    merge.fuse_to_disk(run, run.dir.lora / LORA, out=killed, quantize=False)
    said = capsys.readouterr().out.strip()
    assert said.startswith("fluxnb: removed 2 unfinished temporary folders") and len(said.splitlines()) == 1, said
    assert sorted(p.name for p in killed.glob(".*")) == [".transformer-mine"] and _held(killed)


def test_an_incomplete_merged_folder_is_one_line_at_load_and_replaced_by_the_next_merge(run, tmp_path, capsys):
    """What an older fluxnb's killed re-merge left: config.json, no weights. Loading it says so in one line
    (diffusers' own OSError before); merging again says so and replaces it."""
    folder = merge.fuse_to_disk(run, run.dir.lora / LORA, out=tmp_path, quantize=False)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FluxnbError, match=r"transformer is incomplete .* merge again"):
        merge.load_merged(run, tmp_path, quantize=False)
    capsys.readouterr()
    merge.fuse_to_disk(run, run.dir.lora / LORA, out=tmp_path, quantize=False)
    assert "transformer is incomplete" in capsys.readouterr().out
    assert merge.load_merged(run, tmp_path, quantize=False) is not None
