"""benchmarks/step_flops.py: the matmul work of a LoRA step, counted on the meta device, against a count by hooks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fullsize
import step_flops

SMALL = {**fullsize.FLUX_DEV_TRANSFORMER, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16,
         "num_attention_heads": 2, "axes_dims_rope": (4, 6, 6), "joint_attention_dim": 48, "pooled_projection_dim": 40}
WIDTH, HEIGHT, TEXT = 64, 96, 7


def linear_flops_by_hooks(config: dict) -> float:
    """2 x rows x in x out summed over every nn.Linear call of one forward: a count that does not use the counter."""
    from diffusers import FluxTransformer2DModel

    model = fullsize._empty(FluxTransformer2DModel, config, "meta", torch.bfloat16)
    total = [0.0]

    def hook(module, args, _out):
        total[0] += 2 * args[0].numel() * module.out_features  # rows x in, times out

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(**fullsize.transformer_inputs(WIDTH, HEIGHT, TEXT, config=config))
    return total[0] / 1e12


@pytest.fixture(scope="module")
def counted():
    return step_flops.count(WIDTH, HEIGHT, TEXT, SMALL)


def test_the_forward_linear_work_matches_a_count_by_hooks(counted):
    assert counted["forward"]["linear"] == pytest.approx(linear_flops_by_hooks(SMALL), rel=1e-9)
    assert counted["tokens"] == (WIDTH // 16) * (HEIGHT // 16) + TEXT


def test_a_frozen_base_backward_is_input_gradients_only(counted):
    # One matmul per Linear (not two, as a full fine-tune's weight gradients would add), attention's two per one.
    fwd, bwd = counted["forward"], counted["backward"]
    assert 0.95 * fwd["linear"] <= bwd["linear"] <= fwd["linear"]
    assert bwd["attention"] == pytest.approx(2 * fwd["attention"])


def test_a_step_adds_each_recomputed_block_forward(counted):
    none = step_flops.step_tflop(counted, samples=4, recomputed=0)
    three = step_flops.step_tflop(counted, samples=4, recomputed=3)
    for kind in ("linear", "attention"):
        assert none[kind] == pytest.approx(4 * (counted["forward"][kind] + counted["backward"][kind]))
        assert three[kind] - none[kind] == pytest.approx(12 * counted["block_forward"][kind])
    assert step_flops.floor_s({"linear": 100.0, "attention": 10.0}, 200.0, 50.0) == pytest.approx(0.7)


def test_an_op_it_cannot_sort_is_an_error():
    with pytest.raises(ValueError, match="does not sort"):
        step_flops._kinds({"aten.convolution": 1e12})
