"""GPU check of notebooks 01 + 02: the 8-bit T5 path and the VAE path on CUDA, with the tiny model.

The CPU suite cannot reach these branches (bitsandbytes LLM.int8 needs CUDA; the VAE runs in bf16/fp16 on a GPU).
This builds the tiny FLUX if needed, runs the embed step with T5 loaded through
`BitsAndBytesConfig(load_in_8bit=True)` and the latents step on CUDA, then prints a short result:

    python benchmarks/gpu_check_data.py --tiny-dir /tmp/fluxnb-tiny --run-dir /tmp/fluxnb-gpu-run

Exit status 0 only when every check passed (last line: "gpu_check_data: OK").
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-dir", type=Path, default=Path("/tmp/fluxnb-tiny"))
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/fluxnb-gpu-run"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_data: no CUDA GPU here; run this on the GPU machine.")
        return 1

    from fluxnb.base import memory
    from fluxnb.data import embeddings, latents, prepare
    from fluxnb.run import open_run
    from fluxnb.tiny.flux import ensure_tiny
    from fluxnb.train.batches import CachedDataset

    assets = ensure_tiny(args.tiny_dir)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    run = open_run(args.run_dir, profile="real")  # real profile: CUDA, bf16/fp16, T5 in 8-bit
    run.config = run.config.replace(
        data={"dataset": str(assets.dataset), "width": 64, "height": 96, "flip": True,
              "validation_prompts": list(assets.validation_prompts)},
        model={"model_id": str(assets.model)})
    run.save()
    checks: dict[str, bool] = {}

    # 01: text encoders, T5 through bitsandbytes LLM.int8.
    prepared = prepare(run.config.data, embeddings.load_tokenizer(run.config.model), progress=False)
    print(prepared.report)
    with memory.measure("text encoders: load + encode") as m:
        pipe = embeddings.load_text_encoders(run.config.model, run.hw)
        layers = embeddings.t5_linear_layers(pipe)
        stats = embeddings.cache_embeddings(run, pipe, prepared, progress=False)
    print(f"T5 Linear layers: {dict(layers)}  (Linear8bitLt = int8; plain Linear = T5's `wo`, kept out of int8)")
    print(f"T5 on {pipe.text_encoder_2.device}, CLIP on {pipe.text_encoder.device}; {stats}")
    print(m)
    checks["T5 Linear layers are bnb Linear8bitLt"] = layers.get("Linear8bitLt", 0) > 0
    checks["T5 is_loaded_in_8bit"] = bool(getattr(pipe.text_encoder_2, "is_loaded_in_8bit", False))
    checks["all texts encoded"] = stats.encoded == stats.texts > 0
    freed = memory.free(pipe)
    del pipe
    print(f"freed {freed.gpu_gib:.3f} GiB of GPU memory")
    print(memory.report("after freeing the text encoders"))
    checks["encoders freed (allocated < 0.05 GiB)"] = torch.cuda.memory_allocated() / 2**30 < 0.05

    # 02: VAE on CUDA.
    with memory.measure("VAE: load + encode") as m:
        vae = latents.load_vae(run.config.model, run.hw)
        vae_where = f"{vae.device} {vae.dtype}"
        lstats = latents.cache_latents(run, vae, prepared, progress=False)
    print(f"VAE on {vae_where}; {lstats}")
    print(m)
    checks["VAE ran on CUDA"] = vae_where.startswith("cuda")
    checks["all samples encoded"] = lstats.encoded == lstats.samples > 0
    memory.free(vae)
    del vae
    print(memory.report("after freeing the VAE"))

    # The training side reads both caches back, joined by sample id.
    ds = CachedDataset(run.dir)
    item = ds[0]
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in item.items() if isinstance(v, torch.Tensor)}
    print(f"CachedDataset: {len(ds)} items; first: {shapes}")
    checks["cached tensors finite"] = all(v.isfinite().all() for v in item.values() if isinstance(v, torch.Tensor))
    checks["re-run reuses everything"] = embeddings.cache_embeddings(run, None, prepared, progress=False).encoded == 0

    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    ok = all(checks.values())
    print(f"gpu_check_data: {'OK' if ok else 'FAILED'} on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
