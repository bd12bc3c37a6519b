"""Load the FLUX transformer for training: NF4 (QLoRA), FP8 or plain bf16/fp16, on a GPU or, for the tiny profile,
the CPU.

Memory of FLUX.1-dev's transformer (11.9 B parameters) by format:
    bf16                  23.8 GB   (2 bytes / param)
    FP8 (e4m3)            11.9 GB   (1 byte / param + one fp32 scale per output channel; embedders, output in bf16)
    NF4                    6.7 GB   (4 bits / param + one fp32 scale per 64 weights = 4.5 bits / param)
    NF4 + double quant     6.2 GB   (the scales themselves quantized to 8 bits: 0.37 bits / param less)

Paths (all return a FluxTransformer2DModel ready for `fluxnb.model.lora.add_lora`):
  - GPU, NF4: `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))`, the blog's path. It downloads
    23.8 GB and streams the ~10 GB bf16 shards through system RAM while quantizing: on Colab's 12.7 GB of RAM
    that is where sessions get killed. Do it once, `save_nf4` the result to Drive, and use the next path.
  - pre-quantized: a folder or hub repo written by `save_nf4` (6.7 GB to download, no quantizing) or by
    `save_fp8` (11.9 GB); the folder's config says which.
  - CPU, NF4: diffusers refuses bitsandbytes without a GPU, but bitsandbytes itself runs NF4 on the CPU. So the
    model is loaded in fp32 and its Linear layers are swapped for bitsandbytes Linear4bit with diffusers' own
    `replace_with_bnb_linear`, then quantized by bitsandbytes exactly as diffusers would on a GPU. CI trains that.
  - quantization "none": the plain bf16/fp16 model (about 27.5 GiB to train at 512x768: for 40/80 GB GPUs).
  - quantization "fp8": FP8 weights and matmuls (fluxnb.model.fp8; compute capability >= 8.9, where the tensor
    cores run FP8 at twice their bf16 rate), read tensor by tensor from the bf16 shards and quantized on the
    device: neither the GPU nor the host ever holds the 23.8 GB. On the CPU (the tiny profile) torch runs the
    same FP8 matmuls, slowly: CI checks the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..base.errors import FluxnbError
from ..base.hub_errors import hub_errors
from ..config import ModelConfig
from ..run.hardware import Hardware
from . import fp8

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
    elif model.prequantized:  # NF4 or FP8, as the folder says
        transformer = _load_prequantized(model, hw)
    elif model.quantization == "fp8":
        check_fp8(hw)  # before any download
        transformer = _load_fp8(_local_folder(model.model_id, TRANSFORMER, model.revision), hw)
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
    """(repo or folder, subfolder): a folder written by save_nf4 / save_fp8, or one with a transformer/ inside."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return str(local), (TRANSFORMER if (local / TRANSFORMER / "config.json").is_file() else None)
    from huggingface_hub import file_exists

    with hub_errors(ref):
        return ref, (TRANSFORMER if file_exists(ref, f"{TRANSFORMER}/config.json") else None)


def _local_folder(source: str, subfolder: str | None, revision: str | None = None) -> Path:
    """The model's folder on this machine (config.json + safetensors); a hub repo downloads only `subfolder`."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        with hub_errors(source):
            folder = Path(snapshot_download(source, revision=revision,
                                            allow_patterns=[f"{subfolder}/*"] if subfolder else None))
    return folder / subfolder if subfolder else folder


def _load_prequantized(model: ModelConfig, hw: Hardware):
    folder = _local_folder(*_prequantized_source(model.prequantized))
    raw_q = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if raw_q.get("quant_method") == FP8_METHOD:
        return _load_fp8(folder, hw)
    if hw.device.type == "cuda":
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(folder, dtype=hw.dtype)
        return _finish_nf4(transformer, transformer.config.quantization_config, hw.dtype)
    return _load_prequantized_cpu(folder, hw.dtype)


def _empty_transformer(folder: Path):
    """FLUX's transformer as `folder`'s config.json describes it, on the meta device; and its quantization_config."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = json.loads((folder / "config.json").read_text())
    raw_q = config.pop("quantization_config", None)
    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config), raw_q


def _load_state(model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor], skip=()) -> None:
    """Assign `state` to the empty `model`; a key missing or left over means the folder is not FLUX's layout."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(s) for s in skip)]
    if missing or unexpected:
        raise FluxnbError(f"{folder}: checkpoint does not match FLUX's layout (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def _load_prequantized_cpu(folder: Path, dtype: torch.dtype):
    """What diffusers does for a pre-quantized checkpoint, without its GPU check: empty model, NF4 layers, weights."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
    from safetensors.torch import load_file

    raw_q = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not raw_q or raw_q.get("bnb_4bit_quant_type") != "nf4":
        raise FluxnbError(f"{folder} is not an NF4 checkpoint, nor an FP8 one (its config.json has no nf4 or "
                          f"{FP8_METHOD} quantization_config).")
    model, _ = _empty_transformer(folder)
    cfg = BitsAndBytesConfig.from_dict({**raw_q, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")})
    replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=cfg)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    for name, layer in _linear4bit_modules(model):
        key = f"{name}.weight"
        stats = {k: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
        layer.weight = bnb.nn.Params4bit.from_prequantized(state.pop(key), stats, device="cpu", module=layer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    _load_state(model, folder, state, skip=[f"{n}.weight" for n, _ in _linear4bit_modules(model)])
    return _finish_nf4(model.eval(), cfg, dtype)


FP8_MIN_CAPABILITY = (8, 9)
FP8_METHOD = "fluxnb-fp8"  # config.json's quantization_config.quant_method of an FP8 transformer (stock diffusers
# refuses the unknown method instead of loading the codes as numbers)
FP8_CONFIG = {"quant_method": FP8_METHOD, "weight_dtype": "float8_e4m3fn", "scales": "fp32, one per output channel",
              "modules_to_not_convert": list(fp8.KEEP)}


def check_fp8(hw: Hardware) -> None:
    if hw.device.type == "cuda" and hw.gpu is not None and tuple(hw.gpu.capability) < FP8_MIN_CAPABILITY:
        raise FluxnbError(f"model.quantization='fp8' needs a GPU of compute capability 8.9 or newer (RTX 40, L4, "
                          f"L40S, H100); {hw.gpu.name} is {hw.gpu.capability[0]}.{hw.gpu.capability[1]}. Use "
                          "quantization='nf4'.")


def _load_fp8(folder: Path, hw: Hardware):
    """An FP8 transformer from `folder`, tensor by tensor: a 16-bit checkpoint's Linear weights are quantized on
    the device as they arrive (fluxnb.model.fp8), a save_fp8 folder's codes are taken as they are. The device holds
    the FP8 model plus one 16-bit tensor; the host one tensor."""
    from safetensors import safe_open

    check_fp8(hw)
    model, _ = _empty_transformer(folder)
    for name, module in list(model.named_modules()):
        if fp8.wants_fp8(name, module):
            fp8.swap(model, name, fp8.Fp8Linear(module.in_features, module.out_features, module.bias is not None,
                                                "meta", hw.dtype))
    quantized = {f"{name}.weight" for name, _ in fp8.fp8_layers(model)}
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                t = f.get_tensor(key).to(hw.device)
                if key in quantized and t.dtype != fp8.E4M3:  # a 16-bit checkpoint: quantized here
                    state[key], state[key + "_scale"] = fp8.quantize_rows(t)
                elif t.dtype == fp8.E4M3 or key.endswith(".weight_scale"):
                    state[key] = t  # codes and their fp32 scales, as save_fp8 wrote them
                else:
                    state[key] = t.to(hw.dtype) if t.is_floating_point() else t
    _load_state(model, folder, state)
    return finish_fp8(model.eval())


def finish_fp8(model: torch.nn.Module) -> torch.nn.Module:
    model.register_to_config(quantization_config=FP8_CONFIG)  # save_pretrained then writes a pre-quantized model
    return model


def save_fp8(transformer, folder: str | Path) -> Path:
    """Save an FP8 transformer (before adding LoRA) as a pre-quantized checkpoint: 11.9 GB for FLUX.1-dev, e4m3
    codes and their scales in safetensors. Point ModelConfig.prequantized at it: half the bf16 download, no
    quantizing. Stock diffusers refuses it (an unknown quantization method) rather than misreading the codes."""
    if getattr(transformer, "peft_config", None):
        raise FluxnbError("save_fp8 saves the frozen base only: call it before adding LoRA (fluxnb.model.lora.add_lora).")
    if not fp8.fp8_layers(transformer):
        raise FluxnbError("this transformer has no FP8 layers; load it with quantization='fp8' first.")
    folder = Path(folder)
    transformer.save_pretrained(folder, max_shard_size="5GB")
    return folder
