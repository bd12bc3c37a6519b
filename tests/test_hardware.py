import pytest
import torch

from fluxnb.run import hardware
from fluxnb.base.errors import FluxnbError
from fluxnb.run.hardware import GPUInfo, detect

T4 = GPUInfo("Tesla T4", (7, 5), 14.7)
RTX4090 = GPUInfo("NVIDIA GeForce RTX 4090", (8, 9), 23.6)
H100 = GPUInfo("NVIDIA H100 80GB HBM3", (9, 0), 79.1)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.delenv(hardware.PROFILE_ENV, raising=False)

    def use(info):
        monkeypatch.setattr(hardware, "cuda_info", lambda: info)

    return use


@pytest.mark.parametrize("info, dtype", [(T4, torch.float16), (RTX4090, torch.bfloat16), (H100, torch.bfloat16)])
def test_real_profile_dtype_follows_the_gpu(gpu, info, dtype):
    gpu(info)
    hw = detect()
    assert (hw.profile, hw.device.type, hw.dtype) == ("real", "cuda", dtype)
    assert info.name in hw.describe()


def test_t4_says_why_fp16(gpu):
    gpu(T4)
    assert "no bf16" in detect().describe()


def test_no_cuda_means_tiny_on_cpu_fp32(gpu):
    gpu(None)
    hw = detect()
    assert (hw.profile, hw.device.type, hw.dtype) == ("tiny", "cpu", torch.float32)
    assert "no CUDA GPU" in hw.describe() and len(hw.describe().splitlines()) == 1


def test_env_asks_for_tiny_even_with_a_gpu(gpu, monkeypatch):
    gpu(H100)
    monkeypatch.setenv(hardware.PROFILE_ENV, "tiny")
    hw = detect()
    assert (hw.profile, hw.device.type) == ("tiny", "cpu")


def test_explicit_dtype_and_bad_requests(gpu):
    gpu(H100)
    assert detect(dtype="fp16").dtype == torch.float16
    gpu(T4)
    with pytest.raises(FluxnbError, match="no bf16"):
        detect(dtype="bf16")
    with pytest.raises(FluxnbError, match="not a profile"):
        detect("huge")


@pytest.fixture
def allocator(monkeypatch):
    """Pretend to be a CUDA build on Linux and record the allocator settings detect() makes."""
    calls = []
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(hardware, "_allocator_configured", False)
    monkeypatch.setattr(hardware, "_wsl", lambda: False)
    for name in hardware.ALLOC_CONF_ENVS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_cuda_gets_expandable_segments_unless_the_user_configured_the_allocator(gpu, allocator, monkeypatch):
    gpu(RTX4090)
    detect()
    detect()  # once per process: a user's later runtime setting is not undone by the next detect()
    assert allocator == ["expandable_segments:True"]
    monkeypatch.setattr(hardware, "_allocator_configured", False)
    for name, value in (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
                        ("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")):
        allocator.clear()
        monkeypatch.setenv(name, value)
        detect()
        assert allocator == [], f"{name}={value} was overridden"
        monkeypatch.delenv(name)


def test_no_allocator_change_without_cuda_or_off_linux(gpu, allocator, monkeypatch):
    gpu(None)
    detect()
    gpu(H100)
    detect(profile="tiny")
    monkeypatch.setattr(hardware, "_wsl", lambda: True)  # WSL2: the driver can fail expandable segments
    detect()
    monkeypatch.setattr(hardware.sys, "platform", "win32")
    detect()
    assert allocator == []


def test_a_real_t4_leaves_attention_kernels_to_pytorch(gpu):
    """Only an emulated T4 (FLUXNB_GPU_CAPABILITY) switches flash and cuDNN attention off: the switches are
    process-wide, and the flash one also picks the CPU's kernel, whose numbers then differ (a resumed run in the
    same process once stopped matching an uninterrupted one)."""
    gpu(T4)
    assert detect().dtype == torch.float16
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
