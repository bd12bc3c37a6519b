"""Load the FLUX transformer for training: NF4 (QLoRA) or plain bf16/fp16, on a GPU or, for the tiny profile, the CPU.

Memory of FLUX.1-dev's transformer (11.9 B parameters) by format:
    bf16                  23.8 GB   (2 bytes / param)
    NF4                    6.7 GB   (4 bits / param + one fp32 scale per 64 weights = 4.5 bits / param)
    NF4 + double quant     6.2 GB   (the scales themselves quantized to 8 bits: 0.37 bits / param less)

Paths (all return a FluxTransformer2DModel ready for `fluxnb.model.lora.add_lora`):
  - GPU, NF4: `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))`, the blog's path. It downloads
    23.8 GB and streams the ~10 GB bf16 shards through system RAM while quantizing: on Colab's 12.7 GB of RAM
    that is where sessions get killed. Do it once, `save_nf4` the result to Drive, and use the next path.
  - GPU, pre-quantized: a folder or hub repo written by `save_nf4` (6.7 GB to download, no quantizing).
  - CPU, NF4: diffusers refuses bitsandbytes without a GPU, but bitsandbytes itself runs NF4 on the CPU. So the
    model is loaded in fp32 and its Linear layers are swapped for bitsandbytes Linear4bit with diffusers' own
    `replace_with_bnb_linear`, then quantized by bitsandbytes exactly as diffusers would on a GPU. CI trains that.
  - quantization "none": the plain bf16/fp16 model (about 27.5 GiB to train at 512x768: for 40/80 GB GPUs).
  - quantization "fp8": the bf16 model with torchao's float8 matmuls (compute capability >= 8.9; `float8_`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..base.errors import FluxnbError
from ..base.hub_errors import hub_errors
from ..config import ModelConfig
from ..run.hardware import Hardware

TRANSFORMER = "transformer"


def bnb_config(compute_dtype: torch.dtype, double_quant: bool = False):
    """The blog's NF4 settings; the compute dtype follows the hardware (bf16, or fp16 on a T4, fp32 on the CPU)."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def load_transformer(model: ModelConfig, hw: Hardware, *, prepare_kbit: bool = False):
    """The frozen FLUX transformer as `model` asks, on `hw.device` in `hw.dtype`.

    prepare_kbit=True also runs peft's `prepare_model_for_kbit_training`, as the reference script does. fluxnb
    skips it by default. With `use_gradient_checkpointing=False` (the reference's call) it only freezes every
    parameter (done here anyway) and casts the non-quantized ones (Linear4bit biases, RMSNorm scales: a few MB on
    FLUX, all frozen) from bf16/fp16 to fp32. Frozen weights get no gradient, so fp32 buys no optimizer precision;
    the forward runs under autocast in the compute dtype anyway; bitsandbytes casts each bias back to the input
    dtype on first use. The LoRA weights, the ones that learn, are fp32 either way (fluxnb.model.lora.add_lora).
    """
    if model.quantization == "none":
        transformer = _from_pretrained(model, dtype=hw.dtype).to(hw.device)
    elif model.quantization == "fp8":  # bf16 weights, float8 matmuls (torchao)
        transformer = float8_(_from_pretrained(model, dtype=hw.dtype).to(hw.device), hw)
    elif model.prequantized:
        transformer = _load_prequantized(model, hw)
    elif hw.device.type == "cuda":
        transformer = _from_pretrained(model, dtype=hw.dtype,
                                       quantization_config=bnb_config(hw.dtype, model.double_quant))
    else:
        transformer = quantize_nf4_(_from_pretrained(model, dtype=torch.float32), hw.dtype, model.double_quant)
    transformer.requires_grad_(False)
    if prepare_kbit:
        from peft import prepare_model_for_kbit_training

        transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    return transformer


def _from_pretrained(model: ModelConfig, **kwargs):
    from diffusers import FluxTransformer2DModel

    with hub_errors(model.model_id):
        return FluxTransformer2DModel.from_pretrained(model.model_id, subfolder=TRANSFORMER, revision=model.revision,
                                                      **kwargs)


def _linear4bit_modules(model: torch.nn.Module):
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _finish_nf4(model: torch.nn.Module, bnb_cfg, compute_dtype: torch.dtype) -> torch.nn.Module:
    """What diffusers sets on a model it quantized, plus two CPU details."""
    for _, module in _linear4bit_modules(model):
        module.compute_dtype = compute_dtype  # a checkpoint saved on a bf16 GPU may be trained on a T4 (fp16)
        # and dequantized straight into it: the weights' own dtype (bf16 where it was saved) would make a bf16
        # copy of every weight at every use, then an fp16 one, on a GPU without bf16.
        module.weight.quant_state.dtype = compute_dtype
        # bitsandbytes repacks CPU weights for fast inference the first time a layer runs in eval mode without
        # grad (e.g. while sampling), and that layout has no backward: training after a sample grid would then
        # silently stop gradients at every base layer. Training and sampling must share one layout.
        module.support_avx512bf16_for_cpu = False
    model.register_to_config(quantization_config=bnb_cfg)  # save_pretrained then writes a pre-quantized model
    model.is_loaded_in_4bit = True  # so num_parameters() counts each packed byte as 2 weights, like diffusers
    return model


def quantize_nf4_(model: torch.nn.Module, compute_dtype: torch.dtype, double_quant: bool = False) -> torch.nn.Module:
    """Swap every nn.Linear of `model` for a bitsandbytes NF4 Linear4bit holding the same weights quantized.

    The same module swap and the same Params4bit quantization that diffusers runs on a GPU, done on the CPU.
    """
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    cfg = bnb_config(compute_dtype, double_quant)
    originals = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=cfg)  # new layers, on "meta"
    for name, layer in _linear4bit_modules(model):
        old = originals[name]
        weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, **layer.weight.__dict__)
        layer.weight = weight.to(old.weight.device)  # .to() on a real device is where bitsandbytes quantizes
        if old.bias is not None:
            layer.bias = torch.nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
    return _finish_nf4(model, cfg, compute_dtype)


def save_nf4(transformer, folder: str | Path) -> Path:
    """Save an NF4 transformer (before adding LoRA) as a pre-quantized checkpoint: 6.7 GB for FLUX.1-dev.

    Point ModelConfig.prequantized at the folder (e.g. on Google Drive) and the next session loads it directly,
    with no 23.8 GB download and no quantizing in 12.7 GB of system RAM. Loadable by stock diffusers on a GPU.
    """
    if getattr(transformer, "peft_config", None):
        raise FluxnbError("save_nf4 saves the frozen base only: call it before adding LoRA (fluxnb.model.lora.add_lora).")
    if not getattr(transformer, "is_loaded_in_4bit", False):
        raise FluxnbError("this transformer is not NF4-quantized; load it with quantization='nf4' first.")
    folder = Path(folder)
    transformer.save_pretrained(folder, max_shard_size="5GB")
    return folder


def _prequantized_source(ref: str) -> tuple[str, str | None]:
    """(repo or folder, subfolder): a folder written by save_nf4, or one with a transformer/ inside (hub too)."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return str(local), (TRANSFORMER if (local / TRANSFORMER / "config.json").is_file() else None)
    from huggingface_hub import file_exists

    with hub_errors(ref):
        return ref, (TRANSFORMER if file_exists(ref, f"{TRANSFORMER}/config.json") else None)


def _load_prequantized(model: ModelConfig, hw: Hardware):
    source, subfolder = _prequantized_source(model.prequantized)
    if hw.device.type == "cuda":
        from diffusers import FluxTransformer2DModel

        with hub_errors(source):
            transformer = FluxTransformer2DModel.from_pretrained(source, subfolder=subfolder, dtype=hw.dtype)
        return _finish_nf4(transformer, transformer.config.quantization_config, hw.dtype)
    return _load_prequantized_cpu(source, subfolder, hw.dtype)


def _load_prequantized_cpu(source: str, subfolder: str | None, dtype: torch.dtype):
    """What diffusers does for a pre-quantized checkpoint, without its GPU check: empty model, NF4 layers, weights."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
    from safetensors.torch import load_file

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        with hub_errors(source):
            folder = Path(snapshot_download(source, allow_patterns=[f"{subfolder}/*"] if subfolder else None))
    folder = folder / subfolder if subfolder else folder
    config = json.loads((folder / "config.json").read_text())
    raw_q = config.pop("quantization_config", None)
    if not raw_q or raw_q.get("bnb_4bit_quant_type") != "nf4":
        raise FluxnbError(f"{folder} is not an NF4 checkpoint (no nf4 quantization_config in its config.json).")
    cfg = BitsAndBytesConfig.from_dict({**raw_q, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")})
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=cfg)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    for name, layer in _linear4bit_modules(model):
        key = f"{name}.weight"
        stats = {k: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
        layer.weight = bnb.nn.Params4bit.from_prequantized(state.pop(key), stats, device="cpu", module=layer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(n + ".weight") for n, _ in _linear4bit_modules(model))]
    if missing or unexpected:
        raise FluxnbError(f"{folder}: checkpoint does not match FLUX's layout (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return _finish_nf4(model.eval(), cfg, dtype)


FP8_MIN_CAPABILITY = (8, 9)


def _fp8_filter(module: torch.nn.Module, name: str) -> bool:
    """diffusers-torchao's filter: not the output projection, and only layers float8 matmuls can take (dims % 16)."""
    if name == "proj_out":
        return False
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def float8_(transformer, hw: Hardware):
    """Swap the transformer's Linear layers for torchao's Float8Linear (float8 matmuls, bf16 weights), in place.

    Call before adding LoRA: peft then wraps the Float8Linear layers like any nn.Linear. On a CPU (the tiny
    profile) torchao emulates float8, which checks the wiring but is no faster. Needs compute capability 8.9
    (RTX 40, L4, L40S, H100) and room for 24 GB of bf16 weights.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise FluxnbError("model.quantization='fp8' needs torchao: pip install torchao (then restart the kernel), "
                          "or use quantization='nf4'.") from None
    if hw.device.type == "cuda" and hw.gpu is not None and tuple(hw.gpu.capability) < FP8_MIN_CAPABILITY:
        raise FluxnbError(f"model.quantization='fp8' needs a GPU of compute capability 8.9 or newer (RTX 40, L4, "
                          f"L40S, H100); {hw.gpu.name} is {hw.gpu.capability[0]}.{hw.gpu.capability[1]}. Use "
                          "quantization='nf4'.")
    config = Float8LinearConfig(pad_inner_dim=True, emulate=hw.device.type != "cuda")
    return convert_to_float8_training(transformer, module_filter_fn=_fp8_filter, config=config)
