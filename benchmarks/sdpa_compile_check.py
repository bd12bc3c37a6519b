"""Which attention kernels a compiled step runs under fluxnb's `sdpa_kernel` exclusion of cuDNN, and whether
cuDNN attention's backward still crashes at FLUX's shapes. GPU machine only; ~20 s.

    python benchmarks/sdpa_compile_check.py       # prints one JSON line per check

Checks, each at FLUX.1-dev's attention shape at 512x768 (batch 4, 24 heads, 1536 + 77 tokens, head dim 128, bf16),
forward + backward, kernel names read off torch.profiler:
- eager, compiled with the context around both tracing and running, compiled with the context only around the
  run (traced outside it), compiled with the context only around the tracing;
- eager cuDNN attention forward + backward at batch 1 and 4 (the exclusion was added after "illegal memory
  access" in the backward pass of the non-quantized model), last, since a crash ends the process.
"""

from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

EXCLUDE_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def qkv(batch: int = 4):
    g = torch.Generator("cuda").manual_seed(0)
    return [torch.randn(batch, 24, 1613, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(3)]


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v) * 1.0


def kernels(fn, context) -> dict[str, float]:
    """Attention-kernel families and their GPU ms for one forward + backward of `fn` inside `context`."""
    q, k, v = qkv()
    with context():
        fn(q, k, v).sum().backward()  # warm-up (compiles)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, context():
        fn(q, k, v).sum().backward()
        torch.cuda.synchronize()
    found: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        family = next((f for f in ("cudnn", "flash", "fmha", "efficient", "cutlass", "gemm") if f in name), None)
        if family:
            found[family] = round(found.get(family, 0.0) + e.device_time / 1e3, 3)
    return found


def main() -> None:
    excluded = lambda: sdpa_kernel(EXCLUDE_CUDNN)  # noqa: E731
    none = contextlib.nullcontext
    print(json.dumps({"check": "default backends, eager", "kernels": kernels(attention, none)}), flush=True)
    print(json.dumps({"check": "excluded, eager", "kernels": kernels(attention, excluded)}), flush=True)
    torch._dynamo.reset()
    print(json.dumps({"check": "excluded, compiled: traced and run inside",
                      "kernels": kernels(torch.compile(attention), excluded)}), flush=True)
    torch._dynamo.reset()
    traced_outside = torch.compile(attention)
    q, k, v = qkv()
    traced_outside(q, k, v).sum().backward()  # traced with the default backends
    print(json.dumps({"check": "excluded at run time only (traced outside)",
                      "kernels": kernels(traced_outside, excluded)}), flush=True)
    torch._dynamo.reset()
    traced_inside = torch.compile(attention)
    with excluded():
        traced_inside(q, k, v).sum().backward()
    print(json.dumps({"check": "excluded at trace time only (run outside)",
                      "kernels": kernels(traced_inside, none)}), flush=True)
    for batch in (1, 4):  # the crash the exclusion guards against, if it still happens
        q, k, v = qkv(batch)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
        print(json.dumps({"check": f"cuDNN attention forward + backward, batch {batch}", "ok": True}), flush=True)


if __name__ == "__main__":
    main()
