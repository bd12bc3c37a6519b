"""fluxnb.model.quant (NF4 loading, CPU swap, pre-quantized save/load) and fluxnb.model.lora (presets, count, stock format)."""

import bitsandbytes as bnb
import pytest
import torch
from diffusers import BitsAndBytesConfig, FluxPipeline, FluxTransformer2DModel

from fluxnb.config import LoRAConfig, ModelConfig
from fluxnb.base.errors import FluxnbError
from fluxnb.run.hardware import GPUInfo, Hardware, detect
from fluxnb.base.hub_errors import HubAccessError
from fluxnb.model import lora, quant

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def test_blog_lora_count_on_a_full_size_flux_dev_without_memory():
    """The blog prints `trainable params: 4,669,440 || all params: 11,906,077,760` for rank 4 attention."""
    from accelerate import init_empty_weights

    # By hand: q, k, v, out (3072 -> 3072) in 19 double blocks, q, k, v in 38 single blocks; r * (in + out) each.
    inner = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]  # 24 x 128 = 3072
    per_projection = 4 * (inner + inner)
    expected = (19 * 4 + 38 * 3) * per_projection
    assert expected == 4_669_440

    with init_empty_weights():  # meta device: 11.9 B parameters, no memory
        model = FluxTransformer2DModel(**FLUX_DEV)
    assert model.num_parameters() == 11_901_408_320
    assert lora.add_lora(model, LoRAConfig(rank=4, alpha=4.0, targets="attention")) == expected
    assert lora.describe(model) == "trainable params: 4,669,440 || all params: 11,906,077,760"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny_model(tiny_assets):
    return ModelConfig(model_id=str(tiny_assets.model))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 24, 64, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 77, 32, generator=g), txt_ids=torch.zeros(77, 3),
                img_ids=torch.zeros(24, 3), return_dict=False)


def test_cpu_nf4_swaps_every_linear_for_a_trainable_4bit_layer(tiny_model):
    hw = detect("tiny")
    plain = quant.load_transformer(ModelConfig(model_id=tiny_model.model_id, quantization="none"), hw)
    nf4 = quant.load_transformer(tiny_model, hw)
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(nf4.get_submodule(n), bnb.nn.Linear4bit) for n in linears)
    assert all(nf4.get_submodule(n).weight.quant_type == "nf4" for n in linears)
    assert nf4.config.quantization_config.bnb_4bit_quant_type == "nf4"
    # Each layer's 4-bit weight is bitsandbytes' own NF4 of the original, bit for bit (what a GPU load makes), so
    # the model is the quantized original, not an approximation of ours; its output differs from the original's.
    for n in linears:
        layer, original = nf4.get_submodule(n), plain.get_submodule(n).weight.data
        codes, state = bnb.functional.quantize_4bit(original, blocksize=layer.weight.blocksize, quant_type="nf4")
        assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                           bnb.functional.dequantize_4bit(codes, state)), n
    with torch.no_grad():
        a, b = plain(**_inputs())[0], nf4(**_inputs())[0]
    assert torch.isfinite(b).all() and not torch.equal(a, b)

    lora.add_lora(nf4, LoRAConfig(), seed=0)
    nf4.train()
    nf4(**_inputs())[0].pow(2).mean().backward()
    grads = [p.grad for p in nf4.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in nf4.parameters() if not p.requires_grad)  # the base stays frozen


@pytest.mark.parametrize("double_quant", [False, True])
def test_saved_nf4_loads_back_identically(tiny_model, tmp_path, double_quant):
    hw = detect("tiny")
    model = quant.load_transformer(ModelConfig(model_id=tiny_model.model_id, double_quant=double_quant), hw)
    folder = quant.save_nf4(model, tmp_path / "nf4")
    again = quant.load_transformer(ModelConfig(model_id="unused/not-downloaded", prequantized=str(folder)), hw)
    assert again.config.quantization_config.bnb_4bit_use_double_quant == double_quant
    assert isinstance(again.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(**_inputs())[0], again(**_inputs())[0])
    lora.add_lora(model, LoRAConfig())
    with pytest.raises(FluxnbError, match="before adding LoRA"):
        quant.save_nf4(model, tmp_path / "again")


def test_a_saved_nf4_dequantizes_straight_into_the_compute_dtype(tiny_model, tmp_path):
    """An NF4 folder saved in one dtype (bf16 on a 4090, fp32 here) trains on a T4 in fp16: its weights are
    dequantized into fp16 directly, with no copy in the dtype they were saved in (a T4 has no bf16)."""
    from fluxnb.base.memory import DtypeWatch

    folder = quant.save_nf4(quant.load_transformer(ModelConfig(model_id=tiny_model.model_id), detect("tiny")),
                            tmp_path / "nf4")
    fp16 = Hardware("tiny", torch.device("cpu"), torch.float16, None, "test")
    model = quant.load_transformer(ModelConfig(model_id="unused/not-downloaded", prequantized=str(folder)), fp16)
    states = [m.weight.quant_state for _, m in quant._linear4bit_modules(model)]
    assert states and all(s.dtype == torch.float16 for s in states)
    inputs = {k: v.half() if isinstance(v, torch.Tensor) and not k.endswith("_ids") else v
              for k, v in _inputs().items()}
    with torch.no_grad(), DtypeWatch(torch.float32) as watch:
        model(**inputs)
    assert not [op for op in watch.ops if "dequantize" in op], watch.ops


def test_nf4_on_cuda_goes_through_diffusers_bitsandbytes_config(tiny_model, monkeypatch):
    """The GPU path (not runnable here): from_pretrained gets the blog's NF4 config with the hardware's dtype."""
    calls = []
    monkeypatch.setattr(quant, "_from_pretrained", lambda model, **kw: calls.append(kw) or torch.nn.Linear(1, 1))
    t4 = Hardware("real", torch.device("cuda"), torch.float16, GPUInfo("Tesla T4", (7, 5), 15.0), "test")
    quant.load_transformer(ModelConfig(model_id=tiny_model.model_id, double_quant=True), t4)
    cfg = calls[0]["quantization_config"]
    assert isinstance(cfg, BitsAndBytesConfig) and cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_compute_dtype == torch.float16 and cfg.bnb_4bit_use_double_quant
    assert calls[0]["dtype"] == torch.float16


def test_gated_model_without_access_gets_one_clear_message(monkeypatch):
    from hub_fakes import gated_load

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", gated_load)
    with pytest.raises(HubAccessError, match=r"gated.*huggingface.co/black-forest-labs/FLUX.1-dev.*notebook_login"):
        quant.load_transformer(ModelConfig(), detect("tiny"))


@pytest.mark.parametrize("preset", ["attention", "all-linear", "single-blocks", "to_q,to_v"])
def test_presets_target_the_right_layers_and_load_in_stock_diffusers(tiny_assets, tmp_path, preset):
    hw = detect("tiny")
    model = quant.load_transformer(ModelConfig(model_id=str(tiny_assets.model)), hw)
    n = lora.add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=preset), seed=0)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    expected = {
        "attention": lambda m: m.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")),
        "all-linear": lambda m: isinstance(model.get_submodule(m).base_layer, torch.nn.Linear),
        "single-blocks": lambda m: m.startswith("single_transformer_blocks."),
        "to_q,to_v": lambda m: m.endswith(("to_q", "to_v")),
    }[preset]
    assert adapted and all(expected(m) for m in adapted)
    if preset == "all-linear":
        assert {"x_embedder", "proj_out", "transformer_blocks.0.ff.net.2"} <= adapted
    if preset == "single-blocks":
        assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out"} <= adapted
    with torch.no_grad():  # give B non-zero values so that the file is not trivially the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    path = lora.save_lora(model, tmp_path)

    pipe = FluxPipeline.from_pretrained(tiny_assets.model, dtype=torch.float32)
    pipe.load_lora_weights(path.parent)
    loaded = {k for k, _ in pipe.transformer.named_parameters() if ".lora_" in k}
    assert len(loaded) == 2 * len(adapted)  # every A and B found its layer
    state = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_A." in k}
    assert all(v.shape[0] == 2 for v in state.values())  # rank from the metadata
    assert n == sum(p.numel() for k, p in pipe.transformer.named_parameters() if ".lora_" in k)


def test_unknown_targets_say_what_exists(tiny_model):
    from fluxnb.base.errors import FluxnbError

    model = quant.load_transformer(tiny_model, detect("tiny"))
    with pytest.raises(FluxnbError, match="match no layer.*preset"):
        lora.add_lora(model, LoRAConfig(targets="to_nothing"))
