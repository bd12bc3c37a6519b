"""FP8 frozen base: Linear weights stored as e4m3 codes with one fp32 scale per output channel, matmuls in FP8.

    layer = Fp8Linear.from_linear(linear, torch.bfloat16)     # 1 byte per weight + 4 per output channel
    y = layer(x)                                              # x quantized per row, torch._scaled_mm, bf16 out

Why not torchao: its float8 training (Float8Linear, fluxnb's "fp8" before 2026-12-03) keeps the bf16 weights
(23.8 GB for FLUX.1-dev: no 24 GB card holds them) and casts them to FP8 at every step, and it computes the
weight gradients that LoRA throws away (measured: NF4's speed at 2.2x its memory, BENCHMARKS.md). Its frozen
FP8 weight (torchao.quantization's Float8Tensor, PerRow) is for inference: `quantize_` refuses a CPU, and
backward through it fails ("derivative for aten::_scaled_mm is not implemented", torchao 0.18, tested on the
CPU with the tensor built by hand). So the layer is this module's, one autograd.Function around _scaled_mm.

The numbers. e4m3 has 3 mantissa bits: rounding to it moves a value by at most 2^-4 = 6.25% of itself (about 2.6%
r.m.s. over a binade); its range (max 448, normals down to 2^-6) spans 15 binades, so one scale per row of a
weight (or of an activation) loses no row to underflow. Forward: y = x W^T with x quantized per row (token) on
the fly, W per output channel when loaded; the product of two such roundings errs by ~3.7% r.m.s. per term, and
the K terms of a dot product err independently, so the output's relative error is about that, whatever K is.
Backward: dL/dx = g W, the only gradient wanted (the weight is frozen, LoRA's A and B sit beside in bf16/fp32).
W's per-output scales multiply g's columns (they run along the sum), so they are folded into g before g is
quantized per row; then _scaled_mm against the stored codes, transposed in a temporary copy (the sum must run
along the contiguous dimension of both operands, and the codes are laid out for the forward). Gradients go to
e4m3 too, not e5m2: with a scale per row the range is not the problem e5m2's two extra binades solve for a
whole tensor, and e4m3's extra mantissa bit halves the rounding (torchao's rowwise recipes do the same).
Nothing is saved for the backward but the weight itself, so block streaming (fluxnb.model.offload) and
activation memory behave as with NF4.

Which matmuls run in FP8 (`FP8_MATMULS`): "all" (the default), or "widening": only the layers whose output is
wider than their input (FLUX's MLP up-projections and modulations); the square attention projections and the
narrowing ones (MLP down, single blocks' proj_out) dequantize their codes to the compute dtype per call and run a
16-bit matmul, the weight still stored and streamed in FP8. The first layer benchmark (benchmarks/fp8_step.py, H200,
2026-12-03, BENCHMARKS.md) timed forward + backward of the 3072 x 3072 projections at 220-235 TFLOP/s in FP8
(compiled) against 525-570 in bf16, and the widening ones at 700-1000 in FP8 against 620-720; the training step
decides (benchmarks/train_step.py's impl option fp8mm=widening).

Not quantized (diffusers-torchao's choice): the output projection, the final norm's modulation and the
embedders (`KEEP`: small, and where the error of a few percent would reach every token or the output
directly), and any layer whose dimensions are not multiples of 16 (what _scaled_mm takes).
"""

from __future__ import annotations

import torch

__all__ = ["E4M3", "Fp8Linear", "dequantize_fp8_", "fp8_layers", "quantize_fp8_", "quantize_rows", "swap", "wants_fp8"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
KEEP = ("proj_out", "norm_out", "x_embedder", "context_embedder", "time_text_embed")  # top-level modules, 16-bit
_TINY = 1e-12  # an all-zero row gets this amax, so its scale is not zero (codes 0, values 0)
# Hopper's fast accumulation (fewer promotions of the partial sums to fp32) in the forward matmul, exact
# accumulation in the backward: torchao's float8 defaults. benchmarks/fp8_step.py measures what it costs.
FORWARD_FAST_ACCUM = True
FP8_MATMULS = "all"  # or "widening" (see the docstring); read at each call (a compiled block recompiles on a change)
FP8_MATMUL_CHOICES = ("all", "widening")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): t (..., K) as e4m3 codes (..., K) times fp32 scales (..., 1), one per row, each row's
    largest magnitude landing on e4m3's largest value (448). Computed in fp32."""
    t = t.float()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
               bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """a (M, K) in any float dtype, quantized per row here, @ b (K, N) e4m3 column-major, times b_scale (1, N)."""
    a8, a_scale = quantize_rows(a)
    a8 = a8.contiguous()  # row-major, as _scaled_mm takes it (a strided input can give strided codes)
    mm_dtype = torch.bfloat16 if a.is_cuda else out_dtype  # CUDA's rowwise-scaled kernels write bf16 only
    bias = bias.to(mm_dtype) if bias is not None else None
    out = torch._scaled_mm(a8, b, scale_a=a_scale, scale_b=b_scale, bias=bias, out_dtype=mm_dtype,
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T + bias with W = codes * scale (per output channel); gradient for x only (see the docstring)."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, out_dtype):
        ctx.save_for_backward(codes, scale)
        ctx.x_dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])  # (M, K): every token of the batch
        y = _scaled_mm(rows, codes.t(), scale.t(), out_dtype, bias, fast_accum=FORWARD_FAST_ACCUM)  # (M, N)
        return y.reshape(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors  # (N, K) e4m3, (N, 1) fp32
        g = grad.reshape(-1, grad.shape[-1]).float() * scale.t()  # (M, N): W's scales folded into g
        ones = torch.ones(1, codes.shape[1], dtype=torch.float32, device=codes.device)
        grad_x = _scaled_mm(g, codes.t().contiguous().t(), ones, ctx.x_dtype)  # (M, K); codes (N, K) column-major
        return grad_x.reshape(*grad.shape[:-1], codes.shape[1]), None, None, None, None


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T + bias in x's dtype, W dequantized for this call (and again in the backward: nothing 16-bit is
    kept between them); gradient for x only."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias):
        ctx.save_for_backward(codes, scale)
        weight = (codes.float() * scale).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        weight = (codes.float() * scale).to(grad.dtype)
        return grad @ weight, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen nn.Linear holding e4m3 codes (out, in) and fp32 scales (out, 1); bias in the compute dtype.

    An nn.Linear to peft, so LoRA wraps it like any other; `compute_dtype` tells peft the dtype to make the
    adapter in (as bitsandbytes' layers do). A whole-model dtype cast (`model.to(torch.bfloat16)`) would turn
    the codes into their numbers without their scales: this layer follows devices and keeps its codes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a 16-bit weight
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=E4M3, device=device),
                                         requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                        requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype, device=None) -> Fp8Linear:
        """`linear` quantized on `device` (default: where it is): only one 16-bit weight is there at a time."""
        device = torch.device(device) if device is not None else linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", compute_dtype)
        codes, scale = quantize_rows(linear.weight.detach().to(device))
        layer.weight = torch.nn.Parameter(codes, requires_grad=False)
        layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type  # under autocast the output takes autocast's dtype, as F.linear's would
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if FP8_MATMULS == "all" or self.out_features > self.in_features:
            return _Fp8Matmul.apply(x, self.weight, self.weight_scale, self.bias, out_dtype)
        return _DequantizedMatmul.apply(x.to(out_dtype), self.weight, self.weight_scale, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as numbers (codes x scales), in `dtype` (default: the compute dtype): for merging."""
        return (self.weight.float() * self.weight_scale).to(dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        codes, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != E4M3:  # a dtype cast: keep the codes and scales, follow the device
            self.weight.data = codes.to(self.weight.device)
            self.weight_scale = scale.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, e4m3 weight, per-channel scales, compute_dtype={self.compute_dtype}"


def wants_fp8(name: str, module: torch.nn.Module) -> bool:
    """Whether the module `name` of a FLUX transformer gets FP8 weights (see the module docstring)."""
    if not isinstance(module, torch.nn.Linear) or isinstance(module, Fp8Linear):
        return False
    if name.split(".")[0] in KEEP:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_layers(model: torch.nn.Module) -> list[tuple[str, Fp8Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear)]


def swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_fp8_(model: torch.nn.Module, compute_dtype: torch.dtype, device=None) -> torch.nn.Module:
    """Swap `model`'s Linear layers (those `wants_fp8`) for Fp8Linear, each quantized on `device`, in place;
    then move the rest there. One 16-bit weight at a time is on the device: a 24 GB card quantizes FLUX.1-dev
    (23.8 GB in bf16, 11.9 GB in FP8) from a model in CPU RAM."""
    for name, module in list(model.named_modules()):
        if wants_fp8(name, module):
            swap(model, name, Fp8Linear.from_linear(module, compute_dtype, device))
    return model.to(device) if device is not None else model


def dequantize_fp8_(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every Fp8Linear back for an nn.Linear holding its weight as numbers (16-bit), in place: what a merge
    folds a LoRA into (fluxnb.infer.merge.fuse_into). Inside peft's LoRA layers too (their base_layer)."""
    for name, layer in fp8_layers(model):
        linear = torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(layer.dequantize(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        swap(model, name, linear)
    return model
