"""fluxnb.train.speed: the levers of the fast GPU step keep the plain step's numbers (checked here on the CPU).

Tolerances: the compiled step's loss within 1e-6 relative of the eager step's, LoRA gradients within 1e-5
(measured: loss identical, gradients 2e-8 apart; inductor may fuse and reorder float32 sums). FP8's numbers
are tests/test_fp8.py's, its speed and memory benchmarks/fp8_step.py's.
"""

import pytest
import torch
from model_helpers import HW, grads, loss, model

from fluxnb.config import ConfigError, ModelConfig, TrainConfig
from fluxnb.run.hardware import GPUInfo, Hardware
from fluxnb.model import offload
from fluxnb.train import speed


def assert_same_step(plain, changed, seed: int = 0) -> None:
    """The changed model's loss within 1e-6 (relative) of the plain model's, and each LoRA gradient within 1e-5 of
    that tensor's own largest value: float32 rounding of a reordered sum scales with the numbers summed, not with
    an element that cancelled out to near zero (per element, 7e-8 differences sat at 68% of a 1e-7 allowance)."""
    expected, got = loss(plain, seed), loss(changed, seed)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    want, have = grads(plain), grads(changed)
    for name in want:
        scale = want[name].abs().max().item()
        assert (have[name] - want[name]).abs().max().item() <= 1e-5 * scale, name


def test_compiled_blocks_give_the_plain_steps_loss_and_gradients(tiny_assets):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by the tests before would be reused and not counted
    plain, fast = model(str(tiny_assets.model)), model(str(tiny_assets.model))
    speed.configure(fast, ModelConfig(), TrainConfig(compile="on"), HW, verbose=False)
    assert _is_compiled(fast) and not _is_compiled(plain)
    counters.clear()
    for seed in range(2):
        assert_same_step(plain, fast, seed)
        plain.zero_grad(), fast.zero_grad()
    # The compiled graphs really ran (a failed compile would fall back to eager and prove nothing).
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]


def _is_compiled(transformer) -> bool:
    return all(b._compiled_call_impl is not None for b in offload.transformer_blocks(transformer))


def test_prepare_twice_keeps_one_streamer_and_follows_a_changed_count(tiny_assets):
    transformer = model(str(tiny_assets.model))
    train = TrainConfig(compile="off", gradient_checkpointing=False)
    first = speed.configure(transformer, ModelConfig(offload_blocks=2), train, HW, verbose=False)
    assert not any(map(speed.is_checkpointed, offload.transformer_blocks(transformer))) and len(first.parts) == 2
    assert speed.configure(transformer, ModelConfig(offload_blocks=2), train, HW, verbose=False) is first
    again = speed.configure(transformer, ModelConfig(offload_blocks=99), train, HW, verbose=False)
    assert again is not first and len(again.parts) == 3  # the tiny model has 3 blocks
    assert speed.configure(transformer, ModelConfig(), train, HW, verbose=False) is None
    assert offload.streamer_of(transformer) is None  # the removed streamer detached itself
    with torch.no_grad():
        assert torch.isfinite(loss(transformer))


def test_compile_auto_is_for_cuda_only():
    assert not speed.use_compile(TrainConfig(), HW)
    assert speed.use_compile(TrainConfig(compile="on"), HW)
    assert speed.describe(None, False, 57) == "fluxnb: all 57 blocks on the device; torch.compile: off"


def test_config_checks_the_new_settings():
    with pytest.raises(ConfigError, match="offload_blocks must be an integer >= 0"):
        ModelConfig(offload_blocks=-1)
    with pytest.raises(ConfigError, match="compile='yes' is not supported; choose one of auto, on, off"):
        TrainConfig(compile="yes")


@pytest.mark.parametrize("kept", [1, 2])
def test_checkpointing_only_some_blocks_gives_the_plain_steps_loss_and_gradients(tiny_assets, kept):
    """The budget policy's mix: the last `kept` blocks keep their activations, the others are checkpointed."""
    plain, mixed = model(str(tiny_assets.model)), model(str(tiny_assets.model))
    train = TrainConfig(compile="off", keep_activations=kept)
    speed.configure(mixed, ModelConfig(), train, HW, verbose=False)
    assert_same_step(plain, mixed)


def test_checkpointing_sits_inside_the_blocks_forward(tiny_assets):
    """The backward pass never calls a block again (its module hooks stay quiet): the recomputation runs inside
    the block's forward, where, compiled, the compiler's partition takes it over. And configure takes it off again."""
    transformer = model(str(tiny_assets.model))
    blocks = offload.transformer_blocks(transformer)
    speed.configure(transformer, ModelConfig(), TrainConfig(compile="off"), HW, verbose=False)
    assert not transformer.is_gradient_checkpointing and all(map(speed.is_checkpointed, blocks))
    calls = {"forward": 0, "backward": 0}

    def count(module, args):
        calls["backward" if torch._C._current_graph_task_id() != -1 else "forward"] += 1

    handles = [b.register_forward_pre_hook(count) for b in blocks]
    loss(transformer).backward()
    assert calls == {"forward": 3, "backward": 0}
    for h in handles:
        h.remove()
    speed.configure(transformer, ModelConfig(), TrainConfig(compile="off", gradient_checkpointing=False), HW,
                  verbose=False)
    assert not any(map(speed.is_checkpointed, blocks)) and all("forward" not in vars(b) for b in blocks)


def test_compiled_checkpointed_blocks_keep_only_their_inputs(tiny_assets):
    """Compiled, a checkpointed block is traced as a plain forward; its compiler's partitioner keeps only the
    graph's inputs (compile_block). Bytes kept for the backward pass: all checkpointed < one block kept < none."""
    from torch._dynamo.utils import counters

    saved, graphs = [], []
    for train in (TrainConfig(compile="on"), TrainConfig(compile="on", keep_activations=1),
                  TrainConfig(compile="on", gradient_checkpointing=False)):
        torch._dynamo.reset()
        counters.clear()
        transformer = model(str(tiny_assets.model))
        speed.configure(transformer, ModelConfig(), train, HW, verbose=False)
        saved.append(_saved_bytes(transformer))
        graphs.append(counters["stats"]["unique_graphs"] if not counters["graph_break"] else None)
    assert saved[0] < saved[1] < saved[2]
    # Compiled, not run eagerly (eager checkpointing would order the bytes the same way): the tiny model's three
    # blocks, one graph each (a double-stream block, then two single-stream ones, whose inputs are laid out
    # differently: the first gets a view of the joined text and image tokens).
    assert graphs == [3, 3, 3]


def test_lora_dropout_is_replayed_with_compiled_blocks(tiny_assets):
    """The compiler's recomputation would draw a dropout's masks anew; with a LoRA dropout configure checkpoints
    around each compiled call, whose re-run replays them: the gradients of the same compiled blocks keeping
    their activations."""
    kept, checkpointed = (model(str(tiny_assets.model), dropout=0.5) for _ in range(2))
    speed.configure(kept, ModelConfig(), TrainConfig(compile="on", gradient_checkpointing=False), HW, verbose=False)
    speed.configure(checkpointed, ModelConfig(), TrainConfig(compile="on"), HW, verbose=False)
    assert checkpointed.is_gradient_checkpointing  # around the calls
    assert not any(map(speed.is_checkpointed, offload.transformer_blocks(checkpointed)))
    for transformer in (kept, checkpointed):
        torch.manual_seed(0)  # the dropout masks
        loss(transformer).backward()
    want, have = grads(kept), grads(checkpointed)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_blocks_graph_compiles_within_the_recompile_limit(tiny_assets, monkeypatch):
    """Blocks share compiled frames, whose graphs add up (per image size and batch: block type, input layout,
    training or no gradients): configure raises torch's limit per frame (8; lowered to 2 here, so one image size
    shows it). Over the limit, dynamo would run the rest eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by the tests before would be reused and not counted
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    transformer = model(str(tiny_assets.model))
    speed.configure(transformer, ModelConfig(), TrainConfig(compile="on", keep_activations=1), HW, verbose=False)
    counters.clear()
    loss(transformer).backward()
    with torch.no_grad():
        loss(transformer)
    # a graph per block (see above) for training, and again for no gradients
    assert counters["stats"]["unique_graphs"] == 6 and not counters["graph_break"]


def _saved_bytes(transformer) -> int:
    """Bytes autograd keeps for the backward pass of one loss (checkpointing keeps fewer)."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(transformer)
    return sum(kept)


def test_kept_activations_sit_between_full_checkpointing_and_none(tiny_assets):
    transformer = model(str(tiny_assets.model))
    saved = []
    for train in (TrainConfig(compile="off"), TrainConfig(compile="off", keep_activations=1),
                  TrainConfig(compile="off", keep_activations=2), TrainConfig(compile="off", keep_activations=3),
                  TrainConfig(compile="off", gradient_checkpointing=False)):
        speed.configure(transformer, ModelConfig(), train, HW, verbose=False)
        saved.append(_saved_bytes(transformer))
    assert saved[0] < saved[1] < saved[2] < saved[3] == saved[4]  # 3 = all of the tiny model's blocks


def test_compile_auto_is_off_below_capability_8():
    from unittest import mock

    t4 = Hardware("real", torch.device("cuda"), torch.float16, GPUInfo("Tesla T4", (7, 5), 14.7), "test")
    a100 = Hardware("real", torch.device("cuda"), torch.bfloat16, GPUInfo("A100", (8, 0), 39.4), "test")
    with mock.patch("torch.utils._triton.has_triton", lambda: True):  # as on a Linux CUDA machine
        assert not speed.use_compile(TrainConfig(), t4) and speed.use_compile(TrainConfig(compile="on"), t4)
        assert speed.use_compile(TrainConfig(), a100)


def test_fit_budget_moves_one_notch_toward_memory(tiny_assets):
    transformer = model(str(tiny_assets.model))
    m, t = ModelConfig(), TrainConfig(compile="off", keep_activations=3, batch_size=4, memory_budget_gib=6.0)
    speed.configure(transformer, m, t, HW, verbose=False)
    checkpointed = lambda: [speed.is_checkpointed(b) for b in offload.transformer_blocks(transformer)]  # noqa: E731
    assert checkpointed() == [False] * 3  # all 3 of the tiny model's blocks keep their activations
    assert speed.fit_budget(transformer, m, t, HW, tokens=1613, peak_gib=5.0) is None  # under 6 - 0.3: stays
    _, fitted = speed.fit_budget(transformer, m, t, HW, tokens=1613, peak_gib=6.0)  # 0.3 over: two blocks fewer
    assert fitted.keep_activations == 1 and checkpointed() == [True, True, False]
    frugal = TrainConfig(keep_activations=0, memory_budget_gib=6.0)
    assert speed.fit_budget(transformer, m, frugal, HW, 1613, 9.0) is None  # nothing left to give back
    with torch.no_grad():
        assert torch.isfinite(loss(transformer))


def test_attention_keeps_cudnn_for_nf4_and_excludes_it_for_the_models_it_crashed():
    import contextlib

    gpu = Hardware("real", torch.device("cuda"), torch.bfloat16, GPUInfo("H100", (9, 0), 79.2), "test")
    assert isinstance(speed.attention_backends(gpu), contextlib.nullcontext)  # NF4: PyTorch's own choice
    assert isinstance(speed.attention_backends(HW, "fp8"), contextlib.nullcontext)  # CPU: nothing to choose
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with speed.attention_backends(gpu, "none"):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
