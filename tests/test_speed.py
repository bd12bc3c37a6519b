"""fluxnb.speed: the levers of the fast GPU step keep the plain step's numbers (checked here on the CPU).

Tolerances: the compiled step's loss within 1e-6 relative of the eager step's, LoRA gradients within 1e-5
(measured: loss identical, gradients 2e-8 apart; inductor may fuse and reorder float32 sums). FP8 is
emulated on the CPU: only its wiring is checked here, its speed and memory in benchmarks/train_step.py.
"""

import pytest
import torch
from model_helpers import HW, grads, loss, model

from fluxnb.config import ConfigError, ModelConfig, TrainConfig
from fluxnb.errors import FluxnbError
from fluxnb.hardware import GPUInfo, Hardware
from fluxnb.model import quant
from fluxnb.train import speed


def test_compiled_blocks_give_the_plain_steps_loss_and_gradients(tiny_assets):
    from torch._dynamo.utils import counters

    plain, fast = model(str(tiny_assets.model)), model(str(tiny_assets.model))
    speed.prepare(fast, ModelConfig(), TrainConfig(compile="on"), HW, verbose=False)
    assert speed._is_compiled(fast) and not speed._is_compiled(plain)
    counters.clear()
    for seed in range(2):
        expected, got = loss(plain, seed), loss(fast, seed)
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        want, have = grads(plain), grads(fast)
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        plain.zero_grad(), fast.zero_grad()
    # The compiled graphs really ran (a failed compile would fall back to eager and prove nothing).
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]


def test_prepare_twice_keeps_one_streamer_and_follows_a_changed_count(tiny_assets):
    transformer = model(str(tiny_assets.model))
    train = TrainConfig(compile="off", gradient_checkpointing=False)
    first = speed.prepare(transformer, ModelConfig(offload_blocks=2), train, HW, verbose=False)
    assert not transformer.is_gradient_checkpointing and len(first.parts) == 2
    assert speed.prepare(transformer, ModelConfig(offload_blocks=2), train, HW, verbose=False) is first
    again = speed.prepare(transformer, ModelConfig(offload_blocks=99), train, HW, verbose=False)
    assert again is not first and len(again.parts) == 3  # the tiny model has 3 blocks
    assert speed.prepare(transformer, ModelConfig(), train, HW, verbose=False) is None
    with torch.no_grad():
        assert torch.isfinite(loss(transformer))


def test_compile_auto_is_for_cuda_only():
    assert not speed.use_compile(TrainConfig(), HW)
    assert speed.use_compile(TrainConfig(compile="on"), HW)
    assert speed.describe(None, False, 57) == "fluxnb: all 57 blocks on the device; torch.compile: off"


def test_fp8_swaps_the_big_linears_and_trains(tiny_assets):
    from torchao.float8.float8_linear import Float8Linear  # requirements-dev.txt; for users fp8 is optional

    fp8, plain = model(str(tiny_assets.model), quantization="fp8"), model(str(tiny_assets.model), quantization="none")
    swapped = [n for n, m in fp8.named_modules() if isinstance(m, Float8Linear)]
    assert swapped and not any(n == "proj_out" or "lora_" in n for n in swapped)
    assert any(n.endswith("to_q.base_layer") for n in swapped)  # peft's LoRA wraps the float8 layer
    got, expected = loss(fp8), loss(plain)
    got.backward()
    assert torch.isfinite(got) and abs(got.item() - expected.item()) < 0.01 * expected.item()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads(fp8).values())


def test_fp8_refuses_an_old_gpu_with_the_way_out():
    t4 = Hardware("real", torch.device("cuda"), torch.float16, GPUInfo("Tesla T4", (7, 5), 15.6), "test")
    with pytest.raises(FluxnbError, match=r"compute capability 8.9.*Tesla T4 is 7.5.*quantization='nf4'"):
        quant.float8_(torch.nn.Linear(32, 32), t4)


def test_config_checks_the_new_settings():
    with pytest.raises(ConfigError, match="offload_blocks must be an integer >= 0"):
        ModelConfig(offload_blocks=-1)
    with pytest.raises(ConfigError, match="compile='yes' is not supported; choose one of auto, on, off"):
        TrainConfig(compile="yes")
