"""Merge the LoRA into the base weights, then re-quantize (the blog's "Option 2").

    W' = W + scale * alpha / r * B @ A        for every adapted Linear, then NF4(W') for inference
    (DoRA: W' = m * (W + dW) / ||W + dW|| row by row; LoKr: dW = scale * alpha / r * kron(w1, w2); peft's own merge)

The merged model runs without adapter layers (a little faster, nothing extra in memory) and re-quantizes like
any checkpoint. The order matters: the base is read in 16-bit (fp32 on the CPU), NOT in 4-bit, before fusing.
Fusing into NF4 weights (peft's Linear4bit.merge) would compute NF4(dequant(NF4(W)) + dW): dW of a trained
LoRA is ~1e-3 of W, far below NF4's step (~1/8 of a block's absmax), so most of it rounds away. Fusing in 16-bit
and quantizing once, NF4(W + dW), keeps it the way any fine-tuned checkpoint is kept.

The fuse streams: one tensor at a time is read from the base's safetensors shards (memory-mapped), fused, and
(on a GPU) quantized to NF4 on the GPU, then appended to the output shard being written. So the host holds one
output shard (SHARD_GIB) and one tensor, not the 24 GB bf16 transformer: it fits a free Colab's 12.7 GB.

    merged = fuse_to_disk(run, lora_file)              # RUN/merged/transformer/: NF4 on a GPU, 16-bit elsewhere
    transformer = load_merged(run)                     # NF4 (pre-quantized on disk, or quantized while loading)

A merge replaces an earlier one whole or not at all (a full-size one takes minutes, long enough for a Colab VM to
go): it is built in a temporary folder beside merged/transformer/, its merge.json (base, LoRA and its hash) last,
then swapped in by two renames (fluxnb.base.temps.replace_folder). A kill at any point leaves the old weights with
their merge.json, or the new ones with theirs; the next merge or load_merged finishes a swap cut between its
renames and removes the temporaries nobody writes, saying so in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..base.errors import FluxnbError
from ..base.files import ShardWriter, atomic_write_text
from ..base.hub_errors import hub_errors
from ..base.memory import GiB, available_ram_gib
from ..base.temps import replace_folder, temp_folder
from ..model import fp8
from ..model.lora import merge_module, read_adapter
from ..model.quant import FP8_METHOD, bnb_config, load_transformer
from ..run import Run, writes
from .merged import MERGE_INFO, is_complete, leftovers, repair
from .sampling import load_lora

SHARD_GIB = 2.0  # output shard size: the most the streaming fuse holds in host RAM at once
NF4_BITS = 4.5  # 4-bit codes + one fp32 absmax per 64 weights (fluxnb.model.quant)


def _base_folder(run: Run) -> Path:
    """The base transformer's local folder (config.json + safetensors shards); downloads only transformer/."""
    model = run.config.model
    local = Path(model.model_id).expanduser()
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        with hub_errors(model.model_id):
            local = Path(snapshot_download(model.model_id, revision=model.revision, allow_patterns=["transformer/*"]))
    return local / "transformer"


def transformer_gib(run: Run, dtype: torch.dtype | None = None, *, bits: float | None = None) -> float:
    """Size of the base transformer in `dtype` (or at `bits` per weight), from its config alone (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    model = run.config.model
    with hub_errors(model.model_id):
        config = FluxTransformer2DModel.load_config(model.model_id, subfolder="transformer", revision=model.revision)
    with init_empty_weights():
        empty = FluxTransformer2DModel.from_config(config)
    bits = bits if bits is not None else torch.finfo(dtype).bits
    return sum(p.numel() for p in empty.parameters()) * bits / 8 / GiB


def quantize_on_disk(run: Run) -> bool:
    """NF4 output on a CUDA machine (what inference loads there, 6.7 GB instead of 24); 16-bit elsewhere."""
    return run.hw.device.type == "cuda"


def memory_problem(run: Run, quantize: bool | None = None) -> str | None:
    """Why this machine cannot merge (too little RAM for one output shard, or too little disk), or None."""
    quantize = quantize_on_disk(run) if quantize is None else quantize
    size = transformer_gib(run, run.hw.dtype, bits=NF4_BITS if quantize else None)
    need = 2 * min(size, SHARD_GIB) + 0.5  # the shard being filled, its serialized copy, one tensor and Python
    have = available_ram_gib()
    if need > have:
        return (f"merging needs {need:.1f} GiB of free system RAM (it streams the base one tensor at a time), and "
                f"{have:.1f} GiB are free. Free memory (restart the kernel and run only this section), or use the "
                "LoRA unmerged: it gives the same images.")
    out = run.dir.merged
    disk = shutil.disk_usage(next(p for p in [out, *out.parents] if p.exists())).free / GiB  # nothing made yet
    if size * 1.05 > disk:
        return (f"the merged transformer needs {size:.1f} GiB of disk in {out}, and {disk:.1f} GiB are free: delete "
                "old checkpoints or runs, or use the LoRA unmerged.")
    return None


def check_memory(run: Run, quantize: bool | None = None) -> None:
    """Refuse early, before anything is read or written."""
    problem = memory_problem(run, quantize)
    if problem:
        raise FluxnbError(problem)


def is_quantized(transformer: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return bool(getattr(transformer, "is_loaded_in_4bit", False) or getattr(transformer, "is_loaded_in_8bit", False)
                or any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in transformer.modules()))


def fuse_into(transformer, lora: str | Path, lora_scale: float = 1.0):
    """Fuse the LoRA file into `transformer` in place (stock diffusers calls); refuses an NF4/8-bit base. An FP8
    base is dequantized first (fluxnb.model.fp8): the LoRA then folds into 16-bit numbers, the FP8 ones it was
    trained on, and nothing of it rounds away."""
    from diffusers import FluxPipeline

    if is_quantized(transformer):
        raise FluxnbError("this transformer is quantized (NF4/8-bit): fusing into 4-bit weights rounds most of the "
                          "LoRA away. Load the base in 16-bit (quantization='none') to merge, then re-quantize.")
    if fp8.fp8_layers(transformer):
        fp8.dequantize_fp8_(transformer).register_to_config(quantization_config=None)  # saved: a 16-bit model
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # only the transformer: all fuse_lora touches
    load_lora(pipe, lora)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()  # drop the adapter layers; the fused weights stay
    return transformer


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lora_merges(lora: str | Path, lora_scale: float = 1.0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{transformer module name: fp32 weight (d, k) -> the same weight with the adapter merged, in place or new}.

    LoRA: W + scale * alpha / r * B @ A. DoRA and LoKr: peft's own merge of that one layer (fluxnb.model.lora.
    merge_module: DoRA's magnitude over the new rows' norms, LoKr's Kronecker product)."""
    adapter = read_adapter(lora)
    if adapter.type != "lora":
        return {name: functools.partial(merge_module, tensors=tensors, config=adapter.config, scale=lora_scale)
                for name, tensors in adapter.modules.items()}
    c = adapter.config
    scaling = lora_scale * c.lora_alpha / (math.sqrt(c.r) if c.use_rslora else c.r)

    def add(a: torch.Tensor, b: torch.Tensor):  # (r, k), (d, r)
        return lambda w: w.add_(b.to(w) @ a.to(w), alpha=scaling)

    return {name: add(t["lora_A.weight"], t["lora_B.weight"]) for name, t in adapter.modules.items()}


def _linear_names(config: dict) -> set[str]:
    """The transformer's nn.Linear modules: the layers diffusers' BitsAndBytesConfig would make NF4."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        empty = FluxTransformer2DModel.from_config(config)
    return {n for n, m in empty.named_modules() if isinstance(m, torch.nn.Linear)}


def _nf4(weight: torch.Tensor, key: str, device: torch.device, double_quant: bool) -> dict[str, torch.Tensor]:
    """NF4 `weight` in the layout bitsandbytes' Linear4bit saves (packed codes + key.absmax, key.quant_map, ...)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return {key: packed.cpu(), **{f"{key}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}}


@writes("merge")
def fuse_to_disk(run: Run, lora: str | Path, lora_scale: float = 1.0, out: Path | None = None, *,
                 quantize: bool | None = None) -> Path:
    """Base + LoRA -> out/transformer/ (default RUN/merged), streamed tensor by tensor (see the module docstring).

    quantize: NF4 on disk (the default on CUDA: quantized on the GPU as it goes; 6.7 GB for FLUX.1-dev), else
    the run's 16-bit dtype (fp32 for the tiny profile). Either way a folder `load_merged` and diffusers read.
    """
    from safetensors import safe_open

    out, model = Path(out or run.dir.merged), run.config.model
    quantize = quantize_on_disk(run) if quantize is None else quantize
    dtype = run.hw.dtype  # fp16 on a T4, bf16 on newer GPUs, fp32 on the CPU
    repair(out)  # first: what a stopped merge left may be what fills the disk the check below measures
    check_memory(run, quantize)
    base, merges = _base_folder(run), lora_merges(lora, lora_scale)
    config = json.loads((base / "config.json").read_text())
    scales = _fp8_scales(base, config)  # {} unless the base is an FP8 folder (fluxnb.model.quant.save_fp8)
    linear = _linear_names(config)
    missing = sorted(set(merges) - linear)
    if missing:
        raise FluxnbError(f"{lora} adapts layers this base does not have as Linear layers (e.g. {missing[0]}).")
    target = out / "transformer"
    if target.is_dir() and not is_complete(target):
        print(f"fluxnb: {target} is incomplete (a merge was stopped while it replaced an earlier one); this merge "
              "replaces it.")
    with temp_folder(target) as tmp:  # built beside the target, then swapped in (fluxnb.base.temps.replace_folder)
        writer = ShardWriter(tmp, SHARD_GIB * GiB)
        for shard in sorted(base.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                    if key not in scales:  # an FP8 base's scales are folded into their weights (_fused)
                        writer.add(_fused(f.get_tensor(key), key, merges, linear, dtype, quantize, run, model, scales))
        writer.close()
        config.pop("quantization_config", None)  # the base's (FP8), if any: the output is 16-bit or NF4
        if quantize:
            config["quantization_config"] = bnb_config(dtype, model.double_quant).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        info = {"base_model": model.model_id, "revision": model.revision, "lora": Path(lora).name,
                "lora_sha256": _sha256(Path(lora)), "lora_scale": lora_scale,
                "dtype": str(dtype).removeprefix("torch."), "quantization": "nf4" if quantize else "none"}
        atomic_write_text(tmp / MERGE_INFO, json.dumps(info, indent=2) + "\n")  # last: it makes the folder finished
        replace_folder(tmp, target)
    repair(out)  # the merge.json older fluxnb kept beside transformer/ now describes nothing
    return out


def _fp8_scales(base: Path, config: dict) -> dict[str, torch.Tensor]:
    """An FP8 base's per-channel scales by key (`...weight_scale`; a few MB), read first: the weight a scale
    belongs to may sit in another shard."""
    from safetensors import safe_open

    if (config.get("quantization_config") or {}).get("quant_method") != FP8_METHOD:
        return {}
    scales = {}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            scales |= {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_scale")}  # noqa: SIM118
    return scales


def _fused(tensor: torch.Tensor, key: str, merges, linear: set[str], dtype, quantize: bool, run: Run, model,
           scales: dict[str, torch.Tensor]):
    """One base tensor as the merged checkpoint stores it: the adapter merged (in fp32), then NF4 or `dtype`. An
    FP8 weight (codes, with their scales in `scales`) is first turned into its numbers, in fp32."""
    if key + "_scale" in scales:
        tensor = tensor.float() * scales[key + "_scale"]
    module = key.removesuffix(".weight")
    if key.endswith(".weight") and module in merges:  # on the GPU where there is one
        tensor = merges[module](tensor.to(run.hw.device, torch.float32))
    if quantize and key.endswith(".weight") and module in linear:
        return _nf4(tensor.to(dtype), key, run.hw.device, model.double_quant)
    return {key: tensor.to("cpu", dtype)}


def load_merged(run: Run, folder: Path | None = None, *, quantize: bool = True):
    """The merged transformer, NF4 by default: the same loader as training (fluxnb.model.quant): a pre-quantized
    folder as written by fuse_to_disk(quantize=True), else quantized while loading (BitsAndBytesConfig on CUDA,
    bitsandbytes' own NF4 layers on the CPU). What a stopped merge left is made right first (see `repair`)."""
    folder = Path(folder or run.dir.merged)
    if leftovers(folder):
        with run.writing("repair the merged model"):
            repair(folder)
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        raise FluxnbError(f"{folder} holds no merged model: run fuse_to_disk (notebook 04, merge section) first.")
    if not is_complete(config.parent):
        raise FluxnbError(f"{config.parent} is incomplete (a merge was stopped while it replaced an earlier one): "
                          "merge again (fuse_to_disk, notebook 04's merge section); it replaces the folder.")
    nf4_on_disk = "quantization_config" in json.loads(config.read_text())
    if nf4_on_disk and not quantize:
        raise FluxnbError(f"{folder} holds an NF4 merged model; fuse again with quantize=False for a 16-bit one.")
    cfg = dataclasses.replace(run.config.model, model_id=str(folder), revision=None,
                              prequantized=str(folder) if nf4_on_disk else None,
                              quantization="nf4" if quantize else "none")
    return load_transformer(cfg, run.hw)
