"""fluxnb.train.budget: the memory estimate reproduces the measured peaks it was fitted to, and the policy spends a
bigger budget in its order (batch, kept activations, resident blocks). No GPU: the numbers are BENCHMARKS.md's;
the estimate against the GPU's peaks and what autograd keeps is tests/test_memory_model.py."""

import pytest

from fluxnb.train import budget
from fluxnb.config import LoRAConfig

SMALL, LARGE = budget.tokens_per_sample(512, 768, 77), budget.tokens_per_sample(1024, 1024, 512)


def test_block_weights_and_lora_size_are_flux_dev_s():
    sizes = budget.block_gib()
    assert len(sizes) == 57 and sum(sizes) == pytest.approx(6.2, abs=0.01)  # NF4 of the 57 blocks' 11.8 B
    assert budget.lora_params(LoRAConfig()) == 4_669_440  # r4 on to_q/k/v/out.0 (notebook 03's count)
    assert budget.lora_params(LoRAConfig(targets="to_q")) == 57 * 4 * 6144
    assert budget.lora_params(LoRAConfig(targets="single-blocks")) > 0


def test_a_bigger_budget_buys_speed_in_order():
    plans = [budget.choose(gib) for gib in (2.0, 6.0, 14.7, 23.6, 80.0)]
    assert [p.layout.batch for p in plans] == [1, 4, 4, 4, 4]  # 2 GiB: batch 1 x 4 is what fits
    kept = [p.layout.kept for p in plans]
    assert kept == sorted(kept) and kept[-1] == 57 and plans[-1].layout.streamed == 0
    assert all(p.fits and p.estimate_gib <= p.budget_gib - p.margin_gib for p in plans)
    assert not budget.choose(1.0).fits  # nothing fits: the most frugal layout, flagged
    # 1024x1024 with 512 text tokens at 8 GiB: 1 x 4. Batch 2 (estimated 7.62 GiB) ran out of memory under an 8 GiB
    # cap on the H200 (2026-12-02): its tensors of up to 0.26 GiB need more headroom than 0.3 GiB.
    assert budget.choose(8.0, 1024, 1024, 512).layout.batch == 1
    assert budget.margin_gib(8.0, 2 * budget.tokens_per_sample(1024, 1024, 512)) > 0.5
    assert budget.choose(14.7, 1024, 1024, 512).layout.batch == 2


def test_fused_adamw_unless_8bit_state_saves_a_percent():
    assert budget.choose(6.0).optimizer == "adamw"  # 27 MiB of 6 GiB
    big = LoRAConfig(rank=128, targets="all-linear")  # ~1.2 B parameters: 8-bit state saves ~7 GiB
    assert budget.choose(80.0, lora=big).optimizer == "adamw8bit"


def test_adjust_gives_back_kept_activations_to_cover_the_excess():
    plan = budget.choose(23.6)
    assert budget.adjust(plan.layout, plan.estimate_gib, 23.6, SMALL) is None
    lower = budget.adjust(plan.layout, 23.6, 23.6, SMALL)  # 0.7 GiB over the usable part
    assert lower.kept < plan.layout.kept and lower.peak_gib(SMALL) < 23.6 - budget.margin_gib(23.6)
    assert budget.adjust(budget.Layout(4, 57, 0), 99.0, 6.0, SMALL) is None  # nothing left to give back


def test_plan_table_says_what_and_why():
    plan = budget.choose(14.7)
    table = plan.table()
    assert [r[0] for r in plan.rows()] == ["batch", "activations", "weights streamed", "optimizer", "memory"]
    assert "18 of 57 blocks keep them, 39 recompute them" in table and "why" in table.splitlines()[0]
    assert "planned for 512x768, 77 text tokens" in table and "compiled blocks" in table
    eager = budget.choose(14.7, host_gib=0.0, compiled=False).table()
    assert "0 of 57 blocks keep them, 57 recompute them" in eager and "none: all 57 resident" in eager
    assert "eager blocks" in eager and "bought no time" in eager
    assert plan.settings()["train"]["keep_activations"] == plan.layout.kept


def test_eager_plans_keep_no_activations():
    """Without torch.compile, keeping activations bought no time (H200, fp16, batch 4: 1.19 / 1.12 / 1.18 s per
    step keeping 0 / 8 / 18 blocks' activations), so eager memory goes to resident blocks and the batch."""
    for gib in (6.0, 7.6, 14.7, 23.6, 80.0):
        plan = budget.choose(gib, compiled=False)
        assert plan.fits and plan.layout.kept == 0 and not plan.layout.compiled
    assert budget.choose(23.6, compiled=False).layout.streamed == 0  # the memory went to resident blocks
    t4 = budget.choose(14.7, host_gib=0.0, compiled=False)
    assert t4.layout == budget.Layout(4, 0, 0, compiled=False) and t4.estimate_gib < 14.7 - 2 * t4.margin_gib


def test_host_ram_limits_what_streams():
    assert budget.choose(14.7, host_gib=0.0).layout.streamed == 0  # e.g. Colab: every block resident
    some = budget.choose(6.0, host_gib=3.0)
    assert 0 < budget.streamed_gib(some.layout.streamed) <= 3.0 and some.layout.batch < 4  # less streams: smaller batch


def test_a_kontext_sample_is_planned_with_its_control_tokens():
    """FLUX.1-Kontext-dev's step puts each sample's control image through every block beside the target: at
    512x768 that is 2 x 1536 image tokens + 77 text tokens, and the plan is the plain plan at that token count
    (the same as for a plain image twice as tall), its table saying what it planned for."""
    kontext = budget.choose(14.7, 512, 768, 77, control=True)
    assert kontext.tokens == budget.tokens_per_sample(512, 768, 77, control=True) == 2 * 1536 + 77
    same_tokens = budget.choose(14.7, 512, 1536, 77)
    assert kontext.layout == same_tokens.layout and kontext.estimate_gib == same_tokens.estimate_gib
    for layout in (budget.Layout(2, 57, 6), budget.Layout(1, 0, 0, compiled=False)):
        assert layout.peak_gib(kontext.tokens) == layout.peak_gib(SMALL + 1536)
    assert "planned for 512x768 + its control image, 77 text tokens (3149 tokens per sample)" in kontext.table()
    small = budget.choose(6.0, control=True)  # the 8-12gb preset's budget: twice the tokens, half the batch
    assert small.fits and small.layout.batch == 2 and budget.choose(6.0).layout.batch == 4
