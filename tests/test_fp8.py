"""fluxnb.model.fp8 and quantization "fp8" (fluxnb.model.quant): e4m3 weights with one scale per output channel,
FP8 matmuls through torch._scaled_mm, a gradient for the input only. On the CPU, where torch runs the same FP8
matmuls (slowly); speed and memory are benchmarks/fp8_step.py's, on a GPU.

Tolerances come from e4m3's 3 mantissa bits. Rounding to e4m3 moves a number by at most 2^-4 = 6.25% of itself,
and by 2.65% r.m.s. for numbers spread over a binade (2^-3 / sqrt(12) x sqrt(E[1/m^2]), mantissa m in [1, 2),
log-uniform). A matmul rounds both operands: ~sqrt(2) x 2.65% = 3.75% per product, and the K products of a dot
product err independently, so an output errs by ~3.75% r.m.s. of its size, whatever K is (measured here: 3.6-3.7%).
The layer tests accept 2.5-4.5%: the upper bound is that plus the sample's spread and bf16's output rounding (0.2%);
the lower bound shows that the layer really quantizes (a bf16 matmul errs by ~0.2%).
"""

import json

import pytest
import torch
from model_helpers import HW, grads, loss, model

from fluxnb.base.errors import FluxnbError
from fluxnb.config import LoRAConfig, ModelConfig
from fluxnb.model import fp8, lora, quant
from fluxnb.run.hardware import GPUInfo, Hardware
from fluxnb.train import budget


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error over the whole tensor: |got - want| / |want| (Frobenius norms), in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("k,n,shape", [(256, 192, (64,)), (3072, 512, (2, 77)), (1024, 64, (3, 100))])
def test_layer_output_and_input_gradient_match_bf16_within_e4m3_rounding(k, n, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear, torch.bfloat16)
    assert layer.weight.dtype == fp8.E4M3 and layer.weight_scale.shape == (n, 1) and not layer.weight.requires_grad
    x = torch.randn(*shape, k, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().float().requires_grad_()
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, linear.weight.float(), linear.bias.float())
    g = torch.randn_like(y_ref)
    y.backward(g.to(y.dtype))
    y_ref.backward(g)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert 0.025 < _rel(y, y_ref) < 0.045
    assert 0.025 < _rel(x.grad, x_ref.grad) < 0.045
    # Exactly the matmul of the quantized operands (to bf16's output rounding): no transposed or misplaced scale.
    xq, xs = fp8.quantize_rows(x.detach().reshape(-1, k))
    exact = (xq.float() * xs) @ layer.dequantize(torch.float32).t() + linear.bias.float()
    assert _rel(y.reshape(-1, n), exact) < 0.005
    g16 = g.to(torch.bfloat16).float()  # the gradient as the layer received it
    gq, gs = fp8.quantize_rows(g16.reshape(-1, n) * layer.weight_scale.t())  # W's scales folded into it
    assert _rel(x.grad.reshape(-1, k), (gq.float() * gs) @ layer.weight.float()) < 0.005


def test_quantize_rows_keeps_each_rows_range_and_zero_rows():
    t = torch.tensor([[1e-3, -2e-3, 4e-3], [300.0, -600.0, 1.0], [0.0, 0.0, 0.0]])
    codes, scale = fp8.quantize_rows(t)
    assert codes.dtype == fp8.E4M3 and scale.shape == (3, 1)
    back = codes.float() * scale
    assert torch.equal(back[2], torch.zeros(3))  # an all-zero row stays zero, no NaN from a zero scale
    assert (back[:2] - t[:2]).abs().le(t[:2].abs() * 2**-4 + 1e-9).all()  # within half a step of each value
    assert back[0, 2] == pytest.approx(4e-3) and back[1, 1] == -600.0  # each row's largest lands exactly


def test_fp8_swaps_the_blocks_linears_and_keeps_embedders_and_output_16_bit(tiny_assets):
    transformer = quant.load_transformer(ModelConfig(model_id=str(tiny_assets.model), quantization="fp8"), HW)
    swapped = {name for name, _ in fp8.fp8_layers(transformer)}
    plain = [name for name, m in transformer.named_modules() if type(m) is torch.nn.Linear]
    assert swapped and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in swapped)
    assert {n.split(".")[0] for n in plain} == set(fp8.KEEP)  # everything else: the embedders, norm_out, proj_out
    assert transformer.config.quantization_config["quant_method"] == quant.FP8_METHOD
    assert not fp8.wants_fp8("transformer_blocks.0.x", torch.nn.Linear(24, 32))  # _scaled_mm takes multiples of 16
    assert transformer.dtype == torch.float32  # what diffusers reports: the compute dtype, not e4m3


def test_lora_wraps_fp8_layers_in_the_compute_dtype_and_trains_in_fp32():
    layer = fp8.Fp8Linear.from_linear(torch.nn.Linear(64, 32), torch.bfloat16)
    holder = torch.nn.Module()
    holder.add_module("to_q", layer)
    from peft import inject_adapter_in_model

    wrapped = inject_adapter_in_model(lora.peft_config(LoRAConfig(targets="to_q")), holder)
    assert wrapped.to_q.base_layer is layer  # peft's lora.Linear around it, like any nn.Linear
    assert wrapped.to_q.lora_A["default"].weight.dtype == torch.bfloat16  # peft read compute_dtype, not e4m3
    wrapped.to(torch.float32)  # a whole-model cast: the codes and scales stay (they would lose their meaning)
    assert layer.weight.dtype == fp8.E4M3 and layer.weight_scale.dtype == torch.float32


def test_training_step_with_fp8_is_close_to_the_plain_step_and_far_closer_than_nf4(tiny_assets):
    """Identical inputs and LoRA weights, the tiny profile's compute dtype (fp32) for all three: only the frozen
    weights' format differs, and "none" is the exact reference. The loss is a mean over many outputs, whose
    ~3.75% errors average out (measured 0.65%); a LoRA gradient runs through several FP8 matmuls forward and
    backward (3 blocks), whose errors add up in quadrature (measured 8.5% over all LoRA gradients together,
    cosine 0.9965). NF4 (4 bits, 16 levels per 64 weights) errs far more: 9.8% on the loss, 54% on gradients."""
    results = {}
    for quantization in ("none", "fp8", "nf4"):
        transformer = model(str(tiny_assets.model), quantization=quantization)
        value = loss(transformer)
        value.backward()
        g = grads(transformer)
        results[quantization] = value.item(), torch.cat([g[n].flatten() for n in sorted(g)])
    (ref_loss, ref), (fp8_loss, got), (nf4_loss, nf4) = results["none"], results["fp8"], results["nf4"]
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert abs(fp8_loss - ref_loss) < 0.02 * ref_loss
    assert _rel(got, ref) < 0.15 and torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.99
    assert abs(fp8_loss - ref_loss) < abs(nf4_loss - ref_loss) / 3 and _rel(got, ref) < _rel(nf4, ref) / 3


def test_saved_fp8_loads_back_identically_and_stock_diffusers_refuses_it(tiny_assets, tmp_path):
    from diffusers import FluxTransformer2DModel

    transformer = quant.load_transformer(ModelConfig(model_id=str(tiny_assets.model), quantization="fp8"), HW)
    folder = quant.save_fp8(transformer, tmp_path / "fp8")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == quant.FP8_METHOD
    again = quant.load_transformer(ModelConfig(model_id="unused/not-downloaded", prequantized=str(folder)), HW)
    want, have = transformer.state_dict(), again.state_dict()
    assert want.keys() == have.keys()
    for key in want:  # e4m3 codes, fp32 scales, 16-bit rest: bit for bit, same dtypes
        assert want[key].dtype == have[key].dtype and torch.equal(want[key].float(), have[key].float()), key
    with torch.no_grad():
        assert torch.equal(loss(transformer), loss(again))
    with pytest.raises(ValueError, match="Unknown quantization type, got fluxnb-fp8"):  # not codes read as numbers
        FluxTransformer2DModel.from_pretrained(folder)
    with pytest.raises(FluxnbError, match="no FP8 layers"):
        quant.save_fp8(torch.nn.Linear(16, 16), tmp_path / "plain")
    lora.add_lora(transformer, LoRAConfig())
    with pytest.raises(FluxnbError, match="before adding LoRA"):
        quant.save_fp8(transformer, tmp_path / "again")


def test_compiled_fp8_layer_with_lora_traces_whole_and_matches_eager():
    """torch.compile traces the autograd.Function (no graph break) and gives eager's numbers. (The tiny model's
    blocks compile too, with 3 graphs and no break, but that takes minutes on a CPU.)"""
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.add_module("to_q", fp8.Fp8Linear.from_linear(torch.nn.Linear(64, 32), torch.float32))
    holder.forward = lambda x: holder.to_q(x)
    inject_adapter_in_model(lora.peft_config(LoRAConfig(targets="to_q")), holder)
    x = torch.randn(3, 5, 64)
    outs = []
    for run in (holder, torch.compile(holder, fullgraph=True)):
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, holder.to_q.lora_A["default"].weight.grad.clone()))
        holder.zero_grad()
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_fp8_refuses_an_old_gpu_with_the_way_out():
    t4 = Hardware("real", torch.device("cuda"), torch.float16, GPUInfo("Tesla T4", (7, 5), 15.6), "test")
    with pytest.raises(FluxnbError, match=r"compute capability 8.9.*Tesla T4 is 7.5.*quantization='nf4'"):
        quant.load_transformer(ModelConfig(quantization="fp8", model_id="/nonexistent"), t4)


def test_planner_costs_fp8_weights_and_keeps_them_resident_on_a_24_gb_card():
    """FLUX.1-dev in FP8: 11.98 GB (11.16 GiB) counted on its meta-device model, as fluxnb.model.fp8 stores it
    (codes, scales, the 16-bit rest); the planner's estimate within 0.5% of that."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from test_quant_lora import FLUX_DEV

    with init_empty_weights():
        empty = fp8.quantize_fp8_(FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16), torch.bfloat16, "meta")
    counted = sum(t.numel() * t.element_size() for t in [*empty.parameters(), *empty.buffers()])
    assert counted == pytest.approx(11.98e9, rel=1e-3)
    assert budget.resident_gib("fp8") == pytest.approx(counted / budget.GiB, rel=5e-3)
    assert sum(budget.block_gib("fp8")) / sum(budget.block_gib()) == pytest.approx(1.78, abs=0.01)  # vs NF4
    plan = budget.choose(23.6, quantization="fp8")
    assert plan.fits and plan.layout.streamed == 0 and plan.layout.quantization == "fp8"  # resident first
    assert plan.settings()["model"]["quantization"] == "fp8" and "FP8 weights" in plan.table()
    small = budget.choose(14.7, quantization="fp8")
    assert small.fits and 0 < small.layout.streamed < 57  # streamed below 24 GB
    assert budget.choose(23.6).layout == budget.choose(23.6, quantization="nf4").layout  # NF4's plans unchanged


@pytest.mark.parametrize("k,n", [(256, 256), (512, 128), (128, 512)])
def test_widening_runs_fp8_only_where_the_output_widens_and_16_bit_elsewhere(k, n, monkeypatch):
    """FP8_MATMULS = "widening": a layer whose output is not wider than its input multiplies its dequantized
    codes in bf16 (the weight's e4m3 rounding stays, the activation's and gradient's go: ~2.6% instead of ~3.7%,
    and exactly the bf16 matmul of the dequantized weight); a widening one still runs in FP8."""
    torch.manual_seed(0)
    monkeypatch.setattr(fp8, "FP8_MATMULS", "widening")
    linear = torch.nn.Linear(k, n).to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear, torch.bfloat16)
    x = torch.randn(2, 50, k, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w16 = layer.dequantize(torch.bfloat16)
    x16 = x.detach().requires_grad_()
    want = torch.nn.functional.linear(x16, w16, layer.bias)
    want.backward(g)
    if n > k:  # FP8: the activation is quantized too
        assert _rel(y, want) > 0.02 and _rel(x.grad, x16.grad) > 0.02
    else:
        assert y.dtype == x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x16.grad, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 input under autocast: bf16 out, as F.linear's
        assert layer(x.detach().float()).dtype == torch.bfloat16
