"""lora.type: DoRA and LoKr through peft, beside the default LoRA, which stays exactly as it was.

DoRA trains on the NF4 base; LoKr cannot (peft reshapes its Kronecker product to the packed 4-bit weight's shape)
and is refused in one line before anything loads. Both save as stock diffusers files, resume exactly, load into a
stock pipeline (LoKr through the transformer's load_lora_adapter), merge as peft merges them, and cost the planner
what they cost (their size, DoRA's kept outputs counted by tests/saved_activations.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from train_helpers import make_run

from fluxnb.base.errors import FluxnbError
from fluxnb.config import ConfigError, LoRAConfig, RunConfig
from fluxnb.infer import merge, sampling
from fluxnb.model import lora
from fluxnb.model.quant import quantize_nf4_
from fluxnb.run import open_run
from fluxnb.train import budget, checkpoint, load_for_training, train

LORA = "pytorch_lora_weights.safetensors"
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def random_adapter(transformer, folder, cfg: LoRAConfig, seed: int = 0):
    """Add `cfg`'s adapter with fluxnb's own call, give every trained tensor a seeded random value (B and LoKr's w1
    start at zero; DoRA's magnitudes at the weights' norms), save it as training does; return the file."""
    lora.add_lora(transformer, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else noise / p.shape[-1] ** 0.5)
    return lora.save_lora(transformer, folder)


def peft_merged(transformer, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Every weight after peft's own merge of the adapter (as merge_and_unload), by diffusers' module names."""
    merged = copy.deepcopy(transformer)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("default", scale)
            module.merge()
    return {n.replace(".base_layer", ""): p.detach() for n, p in merged.named_parameters() if "lora_" not in n
            and "lokr_" not in n}


def test_the_default_adapter_is_the_plain_lora_it_was():
    cfg = LoRAConfig()
    assert cfg.type == "lora" and RunConfig().lora.type == "lora"
    before = LoraConfig(r=4, lora_alpha=4.0, lora_dropout=0.0, init_lora_weights="gaussian",
                        target_modules=cfg.target_modules)  # peft_config before lora.type existed
    assert lora.peft_config(cfg).to_dict() == before.to_dict()
    assert lora.peft_config(LoRAConfig(type="dora")).use_dora
    assert type(lora.peft_config(LoRAConfig(type="lokr"))).__name__ == "LoKrConfig"
    with pytest.raises(ConfigError, match="type='loha' is not supported; choose one of lora, dora, lokr"):
        LoRAConfig(type="loha")
    with pytest.raises(ConfigError, match="LoKr has none: set dropout=0"):
        LoRAConfig(type="lokr", dropout=0.1)


@pytest.mark.parametrize("cfg", [LoRAConfig(type="dora"), LoRAConfig(type="lokr"),
                                 LoRAConfig(type="lokr", rank=64, targets="all-linear"),
                                 LoRAConfig(type="dora", rank=16, targets="single-blocks")], ids=repr)
def test_the_planner_counts_each_adapter_as_peft_builds_it_on_flux_dev(cfg):
    from accelerate import init_empty_weights

    with init_empty_weights():  # FLUX.1-dev's 11.9 B parameters on the meta device: no memory
        model = FluxTransformer2DModel(**FLUX_DEV)
    lora.add_lora(model, cfg)
    in_blocks = sum(p.numel() for n, p in model.named_parameters()  # what the planner models (all-linear also
                    if p.requires_grad and "transformer_blocks." in n)  # adapts the embedders: ~0.1% more)
    assert in_blocks == budget.lora_params(cfg)


def _kept(cfg: LoRAConfig, tokens: int) -> int:
    """Bytes autograd still holds after the forward pass of one adapted 3072 -> 3072 Linear (a bf16 base, fp32
    adapter, under autocast as in training): what stays until the backward pass, not what passes."""
    import weakref

    holder = torch.nn.Module()
    holder.add_module("to_q", torch.nn.Linear(3072, 3072, bias=False).to(torch.bfloat16))
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    inject_adapter_in_model(lora.peft_config(cfg), holder.requires_grad_(False))
    for p in holder.parameters():  # fp32 adapter, as fluxnb.model.lora.add_lora keeps it
        if p.requires_grad:
            p.data = p.data.float()
    x = torch.randn(1, tokens, 3072, dtype=torch.bfloat16, requires_grad=True)
    seen = []

    def pack(t):
        seen.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = holder.to_q(x)
    params = {p.untyped_storage().data_ptr() for p in holder.parameters()}
    live = {ptr: size for ref, ptr, size in seen if ref() is not None and ptr not in params}
    del out
    return sum(live.values())


def _kept_per_token(cfg: LoRAConfig) -> float:
    return (_kept(cfg, 128) - _kept(cfg, 64)) / 64  # what grows with the tokens (DoRA's (1, out) scale does not)


def test_doras_kept_outputs_are_what_autograd_keeps():
    """DoRA keeps two outputs of each adapted Linear for its magnitude's gradient (the base's and the LoRA's, 16-bit):
    the planner charges exactly that per token (to_q: one 3072-wide layer per block)."""
    extra = _kept_per_token(LoRAConfig(type="dora")) - _kept_per_token(LoRAConfig())
    assert extra == 2 * 3072 * 2
    one_layer = LoRAConfig(type="dora", targets="to_q")
    assert [x * budget.GiB for x in budget.dora_gib_per_token(one_layer)] == [extra, extra]
    assert budget.dora_gib_per_token(LoRAConfig()) == (0.0, 0.0) and budget.dora_transient_gib(LoRAConfig()) == 0.0
    # the default plans are those of before; a DoRA plan holds DoRA's extra and fits
    assert budget.choose(14.7).layout == budget.Layout(4, 57, 18)
    with_dora = budget.choose(14.7, lora=LoRAConfig(type="dora"))
    assert with_dora.fits and with_dora.layout.kept < 18 and with_dora.layout.extra_gib > 0.1
    assert "DoRA" in with_dora.table() and "DoRA" not in budget.choose(14.7).table()


def test_lokr_is_refused_on_nf4_in_one_line_before_anything_loads(tmp_path, tmp_path_factory, monkeypatch):
    run = make_run(tmp_path / "run", tmp_path_factory, lora={"type": "lokr"})
    assert run.config.model.quantization == "nf4"
    monkeypatch.setattr("fluxnb.train.session.load_for_training", lambda run: pytest.fail("a model was loaded"))
    with pytest.raises(FluxnbError, match=r"lora.type='lokr' cannot train on the NF4 base.*quantization='none'"):
        train(run, live=False)
    assert not run.dir.checkpoints.exists() and not run.dir.lora_file.exists()
    nf4 = quantize_nf4_(FluxTransformer2DModel.from_pretrained(run.config.model.model_id, subfolder="transformer"),
                        torch.float32)
    with pytest.raises(FluxnbError, match="cannot train on the NF4 base"):  # add_lora on its own says the same
        lora.add_lora(nf4, LoRAConfig(type="lokr"))


@pytest.mark.parametrize("kind,quantization", [("dora", "nf4"), ("lokr", "none")])
def test_dora_and_lokr_train_save_and_resume_exactly(tmp_path, tmp_path_factory, kind, quantization):
    settings = dict(lora={"type": kind, "rank": 2, "alpha": 4.0}, model={"quantization": quantization},
                    train={"max_train_steps": 4, "checkpoint_every": 2, "sample_every": 0, "validate_every": 0})
    whole = make_run(tmp_path / "whole", tmp_path_factory, **settings)
    initial = lora.lora_state_dict(load_for_training(whole))
    train(whole, live=False)
    parts = make_run(tmp_path / "parts", tmp_path_factory, **settings)
    train(parts, stop_after=2, live=False)
    train(parts, resume=True, live=False)
    a, b = load_file(whole.dir.lora_file), load_file(parts.dir.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs"
    assert lora.adapter_type(a) == kind and lora.read_adapter(whole.dir.lora_file).type == kind
    trained = {k.removeprefix("transformer."): v for k, v in a.items()}
    assert trained.keys() == initial.keys() and not all(torch.equal(trained[k], initial[k]) for k in initial)
    if kind == "dora":  # the magnitudes learn too
        assert any(not torch.equal(trained[k], initial[k]) for k in initial if "magnitude" in k)
    assert [c.step for c in checkpoint.list_checkpoints(whole.dir)] == [2, 4]


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_streamed_merge_is_peft_merge_and_unload(tmp_path, kind):
    """notebook 04's merge of a DoRA or a LoKr: every weight as peft's own merge leaves it, at lora_scale 0.5."""
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    transformer = FluxTransformer2DModel.from_pretrained(run.config.model.model_id, subfolder="transformer")
    base = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    path = random_adapter(transformer, run.dir.lora, LoRAConfig(type=kind, rank=4, alpha=6.0, targets="all-linear"))
    want = peft_merged(transformer, 0.5)
    merge.fuse_to_disk(run, path, 0.5, out=tmp_path / "merged", quantize=False)
    got = dict(merge.load_merged(run, tmp_path / "merged", quantize=False).named_parameters())
    assert got.keys() == want.keys() == base.keys()
    changed = [n for n in want if not torch.equal(want[n], base[n])]
    worst = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    assert worst < 1e-6 and len(changed) > 10, (worst, len(changed))


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_a_stock_pipeline_loads_them_and_an_nf4_one_refuses_lokr(tiny_assets, tmp_path, kind):
    def image(pipe):
        return pipe("a red house", num_inference_steps=2, width=64, height=64, max_sequence_length=32,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    path = random_adapter(FluxTransformer2DModel.from_pretrained(tiny_assets.model, subfolder="transformer"),
                          tmp_path, LoRAConfig(type=kind, rank=4, alpha=4.0))
    pipe = FluxPipeline.from_pretrained(tiny_assets.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = image(pipe)
    sampling.load_lora(pipe, path)
    styled = image(pipe)
    sampling.set_scale(pipe, 0.5)
    half = image(pipe)
    pipe.disable_lora()
    assert (styled - base).abs().max() > 1e-3 and (half - styled).abs().max() > 1e-4
    assert torch.allclose(image(pipe), base, atol=1e-6)
    nf4 = quantize_nf4_(FluxTransformer2DModel.from_pretrained(tiny_assets.model, subfolder="transformer"),
                        torch.float32)
    pipe = FluxPipeline.from_pretrained(tiny_assets.model, transformer=nf4, dtype=torch.float32)
    if kind == "lokr":
        with pytest.raises(FluxnbError, match="is a LoKr, which cannot run on this NF4 transformer.*merge"):
            sampling.load_lora(pipe, path)
    else:  # DoRA runs on the 4-bit layers (peft dequantizes them for the norms)
        pipe.set_progress_bar_config(disable=True)
        sampling.load_lora(pipe, path)
        assert torch.isfinite(image(pipe)).all()


def test_the_cli_and_notebook_03s_form_set_both_options(tmp_path, tmp_path_factory, capsys):
    """`train --lora-type/--ema-decay` (saved once training's checks pass) and the form's LoRA type and EMA decay."""
    import ipywidgets as W

    from fluxnb.cli import main
    from fluxnb.nb.forms import training_form

    run = make_run(tmp_path / "run", tmp_path_factory, train={"sample_every": 0})
    assert main(["train", "--run-dir", str(run.dir.root), "--lora-type", "lokr"]) == 2  # the tiny base is NF4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora.type='lokr' cannot train on the NF4 base" in err
    assert RunConfig.load(run.dir.root).lora.type == "lora"  # refused: nothing saved
    assert main(["train", "--run-dir", str(run.dir.root), "--ema-decay", "1.5"]) == 2
    assert "ema_decay must be a number in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run.dir.root), "--lora-type", "dora", "--ema-decay", "0.9",
                 "--max-steps", "2"]) == 0
    saved = RunConfig.load(run.dir.root)
    assert (saved.lora.type, saved.train.ema_decay, saved.train.max_train_steps) == ("dora", 0.9, 2)
    assert lora.file_type(run.dir.lora_file) == "dora" and "ema" in checkpoint.latest(run.dir).training_state()

    config = RunConfig.load(run.dir.root)
    form = training_form(config, run.hw)
    fields = {w.description: w for f in form.children[2].children for w in f.children if hasattr(w, "description")}
    kind, message = fields["type"], form.children[2].children[0].children[-1]
    assert isinstance(kind, W.Dropdown) and kind.options == ("lora", "dora", "lokr") and kind.value == "dora"
    assert fields["ema decay"].value == 0.9
    kind.value = "lokr"  # the config's base is NF4: refused in red, the last good value kept
    assert config.lora.type == "dora" and "cannot train on the NF4 base" in message.value
    config.model.quantization = "none"
    kind.value = "lora"
    kind.value = "lokr"
    fields["ema decay"].value = 0.0
    assert (config.lora.type, config.train.ema_decay) == ("lokr", 0.0) and message.value == ""
