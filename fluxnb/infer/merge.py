"""Merge the LoRA into the base weights, then re-quantize (the blog's "Option 2").

    W' = W + scale * alpha / r * B @ A        for every adapted Linear, then NF4(W') for inference

The merged model runs without adapter layers (a little faster, nothing extra in memory) and re-quantizes like
any checkpoint. The order matters: the base is loaded in 16-bit (fp32 on the CPU), NOT in 4-bit, before fusing.
Fusing into NF4 weights (peft's Linear4bit.merge) would compute NF4(dequant(NF4(W)) + dW): dW of a trained
LoRA is ~1e-3 of W, far below NF4's step (~1/8 of a block's absmax), so most of it rounds away. Fusing in 16-bit
and quantizing once, NF4(W + dW), keeps it the way any fine-tuned checkpoint is kept.

    merged = fuse_to_disk(run, lora_file)              # RUN/merged/transformer/  (16-bit, diffusers layout)
    transformer = load_merged(run)                     # NF4 again (BitsAndBytesConfig on CUDA, quant.py on CPU)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import psutil
import torch

from ..errors import FluxnbError
from ..files import atomic_write_text
from ..hub_errors import hub_errors
from ..memory import GiB
from ..model.quant import load_transformer
from ..run import Run, writes
from .sampling import load_lora


def transformer_gib(run: Run, dtype: torch.dtype) -> float:
    """Size of the base transformer in `dtype`, from its config alone (an empty model on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    model = run.config.model
    with hub_errors(model.model_id):
        config = FluxTransformer2DModel.load_config(model.model_id, subfolder="transformer", revision=model.revision)
    with init_empty_weights():
        empty = FluxTransformer2DModel.from_config(config)
    return sum(p.numel() for p in empty.parameters()) * torch.finfo(dtype).bits / 8 / GiB


def memory_problem(run: Run) -> str | None:
    """Why this machine cannot merge (too little free RAM for the unquantized transformer), or None."""
    need = transformer_gib(run, run.hw.dtype) * 1.1  # + one layer's fused copy at a time and Python's overhead
    have = psutil.virtual_memory().available / GiB
    if need <= have:
        return None
    return (f"merging needs the base transformer unquantized in system RAM: {need:.1f} GiB, and {have:.1f} GiB are "
            "free. On a free Colab (12.7 GB) use the LoRA unmerged (it gives the same images), or merge on a machine "
            "with more RAM and upload the merged model.")


def check_memory(run: Run) -> None:
    """Refuse early, before a 24 GB load kills the Colab VM."""
    problem = memory_problem(run)
    if problem:
        raise FluxnbError(problem)


def is_quantized(transformer: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return bool(getattr(transformer, "is_loaded_in_4bit", False) or getattr(transformer, "is_loaded_in_8bit", False)
                or any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in transformer.modules()))


def fuse_into(transformer, lora: str | Path, lora_scale: float = 1.0):
    """Fuse the LoRA file into `transformer` in place (stock diffusers calls); refuses a quantized base."""
    from diffusers import FluxPipeline

    if is_quantized(transformer):
        raise FluxnbError("this transformer is quantized (NF4/8-bit): fusing into 4-bit weights rounds most of the "
                          "LoRA away. Load the base in 16-bit (quantization='none') to merge, then re-quantize.")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # only the transformer: all fuse_lora touches
    load_lora(pipe, lora)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()  # drop the adapter layers; the fused weights stay
    return transformer


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@writes("merge")
def fuse_to_disk(run: Run, lora: str | Path, lora_scale: float = 1.0, out: Path | None = None) -> Path:
    """Base (16-bit on GPU machines, fp32 for the tiny profile; on the CPU) + LoRA -> out/transformer/.

    Returns `out` (default RUN/merged), a folder that `load_merged` and diffusers read like any FLUX repo's.
    """
    from diffusers import FluxTransformer2DModel

    out, model = Path(out or run.dir.merged), run.config.model
    dtype = run.hw.dtype  # fp16 on a T4, bf16 on newer GPUs, fp32 on the CPU
    check_memory(run)
    with hub_errors(model.model_id):  # quantization_config=None on purpose: never 4-bit (see module docstring)
        transformer = FluxTransformer2DModel.from_pretrained(model.model_id, subfolder="transformer",
                                                             revision=model.revision, dtype=dtype)
    fuse_into(transformer, lora, lora_scale)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".transformer-", dir=out))
    try:  # written next to the target and renamed: a disconnect never leaves half a model behind
        transformer.save_pretrained(tmp, max_shard_size="5GB")
        shutil.rmtree(out / "transformer", ignore_errors=True)
        tmp.rename(out / "transformer")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"base_model": model.model_id, "revision": model.revision, "lora": Path(lora).name,
            "lora_sha256": _sha256(Path(lora)), "lora_scale": lora_scale, "dtype": str(dtype).removeprefix("torch.")}
    atomic_write_text(out / "merge.json", json.dumps(info, indent=2) + "\n")
    return out


def load_merged(run: Run, folder: Path | None = None, *, quantize: bool = True):
    """The merged transformer, NF4 again by default: the same loader as training (fluxnb.quant), so CUDA goes
    through diffusers' BitsAndBytesConfig and the CPU through bitsandbytes' own NF4 layers."""
    folder = Path(folder or run.dir.merged)
    if not (folder / "transformer" / "config.json").is_file():
        raise FluxnbError(f"{folder} holds no merged model: run fuse_to_disk (notebook 04, merge section) first.")
    cfg = dataclasses.replace(run.config.model, model_id=str(folder), revision=None, prequantized=None,
                              quantization="nf4" if quantize else "none")
    return load_transformer(cfg, run.hw)
