"""benchmarks/fullsize.py on a scaled-down config: the same code path as the 11.9 B build, with tiny widths."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fullsize

SMALL = {
    "transformer": {**fullsize.FLUX_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                    "num_attention_heads": 2, "axes_dims_rope": (4, 6, 6), "joint_attention_dim": 32,
                    "pooled_projection_dim": 32},
    "t5": {**fullsize.T5_XXL, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2},
    "clip": {**fullsize.CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": 32},
    "vae": {**fullsize.FLUX_VAE, "block_out_channels": (8, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setitem(fullsize.SHARDS, "transformer", "100KB")  # force shards, as the real repo has
    root = tmp_path_factory.mktemp("full")
    fullsize.build_model(root / "model", SMALL, device="cpu")
    fullsize.build_dataset(root / "dataset", [(64, 96), (96, 64), (80, 80)] * 7)
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_builds_flux_dev_layout_that_the_stock_pipeline_loads(built):
    from diffusers import FluxPipeline

    model = built / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == {
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"}
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    assert pipe.text_encoder_2.config.vocab_size == 32128 and pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    for shard in (model / "transformer").glob("*.safetensors"):  # saved in bf16, like the real repo
        assert {t.dtype for t in load_file(shard).values()} == {torch.bfloat16}
    image = pipe("a sun, tnyst style", num_inference_steps=2, width=64, height=64, max_sequence_length=32,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()  # random weights, but finite end to end


def test_full_configs_are_flux_dev_sizes():
    """Parameter counts from the configs alone (meta device): FLUX.1-dev's transformer 11.9 B, T5-XXL 4.76 B."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = fullsize._empty(FluxTransformer2DModel, fullsize.FLUX_DEV_TRANSFORMER, "meta", torch.bfloat16)
    t5 = fullsize._empty(T5EncoderModel, T5Config(**fullsize.T5_XXL), "meta", torch.bfloat16)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == 11.90
    assert round(sum(p.numel() for p in t5.parameters()) / 1e9, 2) == 4.76


def test_dataset_has_captions_and_mixed_aspect_ratios(built):
    rows = [json.loads(line) for line in (built / "dataset" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) >= 20 and all(r["text"].endswith("tnyst style") for r in rows)
    sizes = {Image.open(built / "dataset" / r["file_name"]).size for r in rows}
    assert sizes == {(64, 96), (96, 64), (80, 80)}
    assert len(fullsize.SIZES) >= 20 and fullsize.SIZES.count((512, 768)) >= 10


def test_paired_dataset_is_a_kontext_dataset_fluxnb_reads_whole(tmp_path):
    """The Kontext rehearsal's dataset (build_dataset(pairs=True)): every target has its control, same size."""
    from fluxnb.config import DataConfig
    from fluxnb.data.checks import check_dataset

    folder = fullsize.build_dataset(tmp_path / "pairs", [(64, 96), (96, 64), (80, 80)] * 2, pairs=True)
    prepared = check_dataset(DataConfig(dataset=str(folder), width=64, height=96), progress=False, kontext=True)
    assert len(prepared.items) == 6 and all(i.record.control is not None for i in prepared.items)
    for item in prepared.items:
        assert item.sample.caption.startswith("turn the ") and item.sample.caption.endswith(" into tnyst style")
        control, target = (Image.open(io.BytesIO(read())) for read in (item.record.control, item.record.read))
        assert control.size == target.size and control.getpixel((0, 0)) == (255, 255, 255)  # plain: white ground
