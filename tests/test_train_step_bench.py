"""benchmarks/train_step.py's fluxnb step feeds the model what fluxnb.train feeds it: every issue-25 measurement of
fluxnb goes through it (and benchmarks/fp8_step.py's comparisons)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from model_helpers import model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def test_the_benchmarks_fluxnb_step_runs_the_blocks_in_the_training_dtype(tiny_assets):
    """Until 2026-12-03 the embeddings went in as fp32: the NF4 context embedder returned fp32 (bitsandbytes'
    Linear4bit returns its input's dtype, under autocast too), and the text tokens, then every single-stream block
    (their concatenation), ran in fp32 where fluxnb's training runs bf16."""
    transformer = model(str(tiny_assets.model))
    seen = {}

    def record(name):
        def hook(module, args, kwargs):  # called positionally under gradient checkpointing
            given = dict(zip(("hidden_states", "encoder_hidden_states"), args)) | kwargs
            seen[name] = (given["hidden_states"].dtype, given["encoder_hidden_states"].dtype)
        return hook

    transformer.transformer_blocks[0].register_forward_pre_hook(record("double"), with_kwargs=True)
    transformer.single_transformer_blocks[0].register_forward_pre_hook(record("single"), with_kwargs=True)
    scheduler = FlowMatchEulerDiscreteScheduler(**train_step.FLUX_SCHEDULER)
    batch = train_step.make_inputs(96, 64, 7, batch=2, device="cpu", text_dim=32, pooled_dim=32)  # the tiny widths
    loss = train_step.fluxnb_step(transformer, batch, scheduler, torch.bfloat16)
    assert seen == {"double": (torch.bfloat16,) * 2, "single": (torch.bfloat16,) * 2}
    assert torch.isfinite(loss)
    assert batch["prompt_embeds"].dtype == torch.float32  # the caller's inputs are left as they were
