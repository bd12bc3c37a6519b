"""benchmarks/captioner.py: its full-size configs are the real checkpoints' sizes, and its --tiny mode runs the
whole measurement (build, save, load through fluxnb.data.captioner, caption 512x768 images) on the CPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import captioner as bench  # noqa: E402

from fluxnb.run.hardware import detect  # noqa: E402

# Parameters of the published checkpoints, in billions (unique tensors: BLIP-large's file also stores its tied output
# layer a second time, 0.47 B).
PUBLISHED = {"florence-2-large": 0.77, "florence-2-base": 0.23, "qwen3-vl-2b": 2.13, "qwen2.5-vl-3b": 3.75,
             "blip-large": 0.45}


@pytest.mark.parametrize("name", sorted(bench.FULL))
def test_full_size_configs_have_the_published_parameter_counts(name):
    from transformers import AutoConfig, AutoModelForImageTextToText

    kind, sizes = bench.FULL[name]
    if kind == "qwen":  # its processor needs torchvision; the config alone says the size
        config = AutoConfig.for_model(sizes["model_type"], text_config=sizes["text"], vision_config=sizes["vision"],
                                      tie_word_embeddings=sizes["tie_word_embeddings"])
    else:
        config, processor = bench.tiny.parts(kind, sizes)
        if kind == "florence2":  # 577 image tokens at 768 px, and the image token where the real one has it
            assert processor.image_processor.image_seq_length == 577 and config.image_token_id == 51289
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.006)


def test_tiny_mode_measures_a_captioner_through_fluxnbs_path(tmp_path):
    args = argparse.Namespace(out=tmp_path, tiny=True, images=2, batch_size=2)
    report = bench.measure("florence-2-large", args, detect("tiny"))
    assert report["family"] == "Florence-2" and report["s_per_image"] > 0
    assert report["first_caption"].startswith("mucha style, ") and "emptied" in report["freed"]
