"""GPU check of notebooks 04/05's CUDA-only paths (issue 5): run on the device machine, prints one line per check.

    python benchmarks/check_inference_gpu.py                   # tiny model on CUDA: NF4, no-encoder route, merge
    python benchmarks/check_inference_gpu.py --fullsize DIR    # + merge/re-quantize FLUX.1-dev-sized random weights
                                                               #   (DIR from benchmarks/fullsize.py --out DIR)

On the CPU the tiny profile covers the logic; what only a GPU runs is: the NF4 transformer through diffusers'
BitsAndBytesConfig inside a FluxPipeline, resident and with its blocks streamed (fluxnb.model.offload), T5 in 8-bit for
prompts (the T4 route), and the merged model reloaded with BitsAndBytesConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lora_helpers import make_lora, save_random_lora  # noqa: E402

from fluxnb.run.hardware import detect  # noqa: E402
from fluxnb.infer import merge, sampling  # noqa: E402
from fluxnb.run import open_run  # noqa: E402


def tiny_on_cuda(root: Path) -> None:
    run = open_run(root / "run", profile="tiny", verbose=False)
    run.hw = detect("real")  # the same tiny FLUX, but on CUDA in bf16: the real code paths
    run.config = run.config.replace(model={"quantization": "nf4"})
    lora = make_lora(run.config.model.model_id, run.dir.lora)
    settings = dataclasses.replace(sampling.default_settings(run), steps=4)
    prompts = run.config.data.validation_prompts[:2]
    for plan in (sampling.Plan(True, False, True, "NF4 + encoders"), sampling.Plan(True, True, False, "NF4, blocks streamed, no encoders")):
        torch.cuda.reset_peak_memory_stats()
        pipe = sampling.load_pipeline(run, plan)
        sampling.load_lora(pipe, lora)
        base, styled = sampling.base_vs_lora(pipe, prompts, settings, run)
        kind = type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer).__name__
        print(f"ok {plan.reason}: {kind}, {len(styled)} images, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        del pipe
    merged = merge.fuse_to_disk(run, lora)
    nf4 = merge.load_merged(run, merged)
    pipe = sampling.load_pipeline(run, transformer=nf4)
    images = sampling.generate(pipe, prompts, settings, run)
    print(f"ok merged + NF4 reload: {type(nf4.transformer_blocks[0].attn.to_q).__name__}, {len(images)} images")


def fullsize(folder: Path, root: Path) -> None:
    """Fuse a rank-4 attention LoRA into FLUX.1-dev-sized weights in bf16, save, reload as NF4 through diffusers."""
    from diffusers import FluxTransformer2DModel

    run = open_run(root / "full", profile="real", verbose=False)
    run.config = run.config.replace(model={"model_id": str(folder)})
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
    lora = save_random_lora(transformer, root / "full-lora", std=1e-3)
    del transformer
    start = time.perf_counter()
    out = merge.fuse_to_disk(run, lora)
    print(f"ok fused FLUX.1-dev-sized transformer in {time.perf_counter() - start:.0f} s -> {out}")
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    nf4 = merge.load_merged(run, out)
    print(f"ok NF4 reload in {time.perf_counter() - start:.0f} s, {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
          f"allocated, {type(nf4.transformer_blocks[0].attn.to_q).__name__}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fullsize", type=Path, default=None, help="folder with transformer/ from fullsize.py")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check is for the GPU machine"
    with tempfile.TemporaryDirectory() as tmp:
        tiny_on_cuda(Path(tmp))
        if args.fullsize:
            fullsize(args.fullsize, Path(tmp))
