"""Which profile runs, on which device, in which dtype: one source for all three, printed as one line.

- "real": FLUX.1-dev on a CUDA GPU. bf16 where the GPU has it (compute capability >= 8.0: A100, 30/40-series,
  H100), fp16 on a T4 / 20-series / V100 (7.x: no bf16 tensor cores).
- "tiny": the offline tiny FLUX (fluxnb.tiny.flux) on the CPU in fp32. Chosen with FLUXNB_PROFILE=tiny, and
  automatically when there is no CUDA GPU (FLUX.1-dev on 2 CPU cores would take days per step).

A smaller GPU can be emulated on a bigger one: FLUXNB_GPU_MEMORY_GIB=14.7 caps this process's PyTorch allocations
there (`torch.cuda.set_per_process_memory_fraction`) and makes fluxnb see a GPU of that size (presets, inference
plan). FLUXNB_GPU_CAPABILITY=7.5 makes it see an older GPU's compute capability, with what follows from it: fp16
instead of bf16, torch.compile off ("auto"), and scaled-dot-product attention limited to the kernels that GPU has
(memory-efficient and math; flash and cuDNN attention need 8.0), whose memory differs. benchmarks/rehearsal.py runs
the notebooks that way inside the T4's, an 8 GB card's and a 4090's limits.

On a CUDA GPU, the first detect() switches PyTorch's allocator to expandable segments (`expandable_segments:True`,
torchtune's default too) unless PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF is set: memory freed in a step can then
be unmapped and mapped again where a larger request needs it, instead of staying cached in pieces too small for it
(BENCHMARKS.md, "Memory-budget policy": the same speed, less reserved memory left unusable at a full card).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

import torch

from ..base.errors import FluxnbError
from ..config import PROFILES

PROFILE_ENV = "FLUXNB_PROFILE"
GPU_MEMORY_ENV = "FLUXNB_GPU_MEMORY_GIB"
GPU_CAPABILITY_ENV = "FLUXNB_GPU_CAPABILITY"
FLASH_ATTENTION_CAPABILITY = (8, 0)  # flash and cuDNN attention kernels need an Ampere or newer GPU
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # PyTorch reads either (the second is older)
_allocator_configured = False  # use_expandable_segments ran: later calls leave the allocator as it is now
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class GPUInfo:
    name: str
    capability: tuple[int, int]
    total_gib: float

    @property
    def has_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def compiles_well(self) -> bool:
        """Triton, torch.compile's GPU code generator, supports it well (compute capability 8.0 and up)."""
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    profile: str  # "real" | "tiny"
    device: torch.device
    dtype: torch.dtype  # compute dtype of the frozen model and autocast
    gpu: GPUInfo | None
    reason: str

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in _DTYPES.items() if v == self.dtype)

    def compiles(self, setting: str) -> bool:
        """Whether train.compile=`setting` ("auto" | "on" | "off") compiles the blocks here. "auto": on a CUDA
        GPU of compute capability 8.0 and up, where Triton is installed (Linux CUDA builds have it, Windows
        usually not). Below 8.0 (T4, 20-series) Triton's support is poor and the step is bound by arithmetic, not
        launch overhead, so compiling buys little there."""
        if setting != "auto":
            return setting == "on"
        if self.device.type != "cuda" or (self.gpu is not None and not self.gpu.compiles_well):
            return False
        from torch.utils._triton import has_triton

        return has_triton()

    def describe(self) -> str:
        where = f"{self.gpu.name} ({self.gpu.total_gib:.0f} GiB, sm_{self.gpu.capability[0]}{self.gpu.capability[1]})" if self.gpu else "CPU"
        return f"fluxnb: profile '{self.profile}' on {where}, {self.dtype_name} - {self.reason}"


def cuda_info() -> GPUInfo | None:
    """The first CUDA GPU, or None. Tests replace this function to pretend to be a T4 or an H100."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GPUInfo(props.name, (props.major, props.minor), props.total_memory / 2**30)


def gpu_limit(gpu: GPUInfo | None) -> GPUInfo | None:
    """`gpu` as FLUXNB_GPU_MEMORY_GIB caps it (PyTorch's allocator then refuses more: an out-of-memory error like
    the smaller card's), or unchanged when the variable is unset. Memory outside PyTorch's allocator (the CUDA
    context, cuBLAS workspaces) is not capped."""
    raw = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if gpu is None or not raw:
        return gpu
    try:
        cap = float(raw)
    except ValueError:
        raise FluxnbError(f"{GPU_MEMORY_ENV}={raw!r} is not a number of GiB (e.g. 14.7); unset it to use the whole GPU.") from None
    if not 0 < cap <= gpu.total_gib:
        raise FluxnbError(f"{GPU_MEMORY_ENV}={raw} must be between 0 and this GPU's {gpu.total_gib:.1f} GiB.")
    torch.cuda.set_per_process_memory_fraction(cap / gpu.total_gib, 0)
    return GPUInfo(f"{gpu.name} capped at {cap:g} GiB", gpu.capability, cap)


def emulated_capability(gpu: GPUInfo | None) -> GPUInfo | None:
    """`gpu` with the compute capability FLUXNB_GPU_CAPABILITY gives (e.g. 7.5, a T4's), or unchanged when unset."""
    raw = os.environ.get(GPU_CAPABILITY_ENV, "").strip()
    if gpu is None or not raw:
        return gpu
    try:
        major, minor = (int(part) for part in raw.split("."))
    except ValueError:
        raise FluxnbError(f"{GPU_CAPABILITY_ENV}={raw!r} is not a compute capability like 7.5; unset it to use "
                          "this GPU's own.") from None
    if (major, minor) > gpu.capability:
        raise FluxnbError(f"{GPU_CAPABILITY_ENV}={raw} is newer than this GPU's {gpu.capability[0]}."
                          f"{gpu.capability[1]}: only an older GPU can be emulated.")
    return GPUInfo(f"{gpu.name} as sm_{major}{minor}", (major, minor), gpu.total_gib)


def limit_attention_kernels(gpu: GPUInfo) -> None:
    """Scaled-dot-product attention only through the kernels `gpu` has: below compute capability 8.0 (a T4)
    memory-efficient attention and the math path, not flash or cuDNN attention. A real T4 needs no switch (PyTorch
    skips those kernels there); with FLUXNB_GPU_CAPABILITY on a newer GPU this makes attention's memory a T4's.
    The switches are process-wide and PyTorch's flash switch also picks the CPU's kernel, so only emulation
    flips them."""
    if gpu.capability < FLASH_ATTENTION_CAPABILITY:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def use_expandable_segments() -> bool:
    """Switch PyTorch's CUDA allocator to expandable segments, unless the user configured the allocator (either
    variable set, to anything: a runtime setting would reset their other keys) or the platform lacks them (they
    are Linux-only; under WSL2 the driver can fail the first allocation with them, pytorch/pytorch#192330). Once
    per process, so a later runtime change of the user's stays. Takes effect for memory reserved from then on.
    True when it was switched here."""
    global _allocator_configured
    if _allocator_configured or any(os.environ.get(name, "").strip() for name in ALLOC_CONF_ENVS):
        return False
    if not sys.platform.startswith("linux") or _wsl() or not torch.version.cuda:
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: torch.cuda.memory's
    (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    _allocator_configured = True
    return True


def _wsl() -> bool:
    """Windows' Linux subsystem (its kernel's release names Microsoft)."""
    return "microsoft" in platform.uname().release.lower()


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


def detect(profile: str | None = None, dtype: str = "auto") -> Hardware:
    """Pick profile, device and dtype. `profile` overrides FLUXNB_PROFILE; `dtype` "auto" picks from the GPU."""
    requested = (profile or os.environ.get(PROFILE_ENV, "")).strip().lower() or None
    if requested is not None and requested not in PROFILES:
        raise FluxnbError(f"{PROFILE_ENV}={requested!r} is not a profile; use 'real' or 'tiny' (or leave it unset).")
    real_gpu = gpu_limit(cuda_info())
    gpu = emulated_capability(real_gpu)
    if requested == "tiny":
        profile_name, reason = "tiny", f"asked for ({PROFILE_ENV}=tiny or profile='tiny')"
    elif gpu is None and requested is None:
        profile_name, reason = "tiny", "no CUDA GPU found, so the offline tiny FLUX runs instead of FLUX.1-dev"
    elif gpu is None:
        profile_name, reason = "real", "asked for without a CUDA GPU: expect it to be extremely slow"
    else:
        profile_name, reason = "real", "CUDA GPU found"

    device = torch.device("cuda") if gpu is not None and profile_name == "real" else torch.device("cpu")
    if device.type == "cuda":
        use_expandable_segments()
        if gpu is not real_gpu:  # an emulated older GPU: the attention kernels it has (a real one has only those)
            limit_attention_kernels(gpu)
    if dtype != "auto":
        chosen = dtype
        reason += f"; dtype {dtype} as configured"
    elif device.type == "cpu":
        chosen = "fp32"
    elif gpu is not None and gpu.has_bf16:
        chosen = "bf16"
    else:
        chosen = "fp16"
        reason += "; fp16 because this GPU has no bf16 (compute capability < 8.0)"
    if chosen == "bf16" and gpu is not None and not gpu.has_bf16 and device.type == "cuda":
        raise FluxnbError(f"dtype bf16 was asked for, but {gpu.name} has no bf16 support; use 'fp16' or 'auto'.")
    return Hardware(profile_name, device, _DTYPES[chosen], gpu, reason)
