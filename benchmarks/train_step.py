"""Seconds per training step and peak GPU memory: the blog's reference recipe vs fluxnb, in ONE run, same inputs.

Runs on the GPU machine (no FLUX download there: benchmarks/fullsize.py builds a random-weight FLUX.1-dev
transformer of the real size, 11.9 B parameters, so time and memory are real; image quality is not).

    python benchmarks/train_step.py                       # all cases -> benchmarks/results/<date>-<device>.json
    python benchmarks/train_step.py --cases nf4-512x768-bf16 --samples 4 \
        --impls reference,fluxnb+batch=4,fluxnb+batch=4+offload=57,reference --tag mine

Each implementation runs in its own process, so one's cached allocations cannot inflate the other's peak. One
timed step = one optimizer step of `--samples` samples (the blog: 4, as batch 1 x 4 accumulation) = forward +
backward per micro-batch, then clip + optimizer step, synchronised. `--warmup` steps (compiling happens there),
then `--steps` timed steps, median reported. Peak = torch.cuda.max_memory_allocated during the timed steps,
model included. List `reference` twice to bracket the machine's drift: the ratio uses the mean.

reference: transcribed from the blog / diffusers' train_dreambooth_lora_flux_miniature.py: BitsAndBytesConfig NF4
  + prepare_model_for_kbit_training + LoRA r4 on to_k/to_q/to_v/to_out.0 + gradient checkpointing + fp32 LoRA
  params + bnb AdamW8bit + accelerate autocast, batch 1; the step is tests/reference_step.py (the script's lines).
fluxnb: fluxnb.model.quant.load_transformer + fluxnb.model.lora.add_lora + fluxnb.train.speed.configure + fluxnb.train.step.training_step
  under fluxnb.train.speed.attention_backends, as fluxnb.train runs them; options in the name (see fluxnb_setup).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# name: (width, height, text tokens, dtype)
CASES = {
    "nf4-512x768-bf16": (512, 768, 77, "bf16"),
    "nf4-1024x1024-bf16": (1024, 1024, 512, "bf16"),
    "nf4-512x768-fp16": (512, 768, 77, "fp16"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLUX_VAE = SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611, block_out_channels=[128, 256, 512, 512])
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
GiB = 2**30
_HELD: list = []  # contexts this worker process stays inside


def make_inputs(width: int, height: int, tokens: int, seed: int = 0, batch: int = 1, *, device: str = "cuda",
                text_dim: int = 4096, pooled_dim: int = 768) -> dict[str, torch.Tensor]:
    """What the caches hold for `batch` samples: VAE posterior (mean, std) and the T5/CLIP embeddings (FLUX.1-dev's
    widths by default), fp32, on `device`."""
    g = torch.Generator().manual_seed(seed)
    h, w, b = height // 8, width // 8, batch
    cpu = {"latent_mean": torch.randn(b, 16, h, w, generator=g), "latent_std": 0.05 * torch.rand(b, 16, h, w, generator=g),
           "prompt_embeds": torch.randn(b, tokens, text_dim, generator=g),
           "pooled_prompt_embeds": torch.randn(b, pooled_dim, generator=g), "text_ids": torch.zeros(tokens, 3)}
    return {k: v.to(device) for k, v in cpu.items()}


def reference_setup(ckpt: Path, dtype: torch.dtype):
    """The blog's code, in its order (section 'Setting up 4-bit Quantization' and 'Defining LoRA Configuration')."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, prepare_model_for_kbit_training

    nf4_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    transformer = FluxTransformer2DModel.from_pretrained(ckpt, subfolder="transformer", quantization_config=nf4_config,
                                                         torch_dtype=dtype)
    transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    transformer.enable_gradient_checkpointing()
    cast_training_params([transformer], dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    return transformer, optimizer, params


def reference_step(transformer, batch, scheduler, dtype):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from reference_step import reference_loss

    logvar = 2 * torch.log(batch["latent_std"])
    dist = DiagonalGaussianDistribution(torch.cat([batch["latent_mean"], logvar], dim=1))
    args = SimpleNamespace(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, guidance_scale=1.0)
    return reference_loss(transformer, scheduler, dist, batch, args, FLUX_VAE, weight_dtype=dtype,
                          device=torch.device("cuda"))


def parse_impl(impl: str) -> dict[str, str]:
    """"fluxnb+compile+offload=57" -> {"compile": "", "offload": "57"}; the options are fluxnb's config fields."""
    return dict((opt.split("=") + [""])[:2] for opt in impl.split("+")[1:])


def fluxnb_setup(ckpt: Path, dtype: torch.dtype, opts: dict[str, str], plan: dict | None = None):
    """fluxnb's own code path, as fluxnb.train runs it: quant.load_transformer, lora.add_lora, speed.configure.

    Options: cudnn (let SDPA pick cuDNN attention, as torch does by default), nocompile / compile (train.compile
    "off" / "on"; default "auto"), nockpt (no gradient checkpointing), dq (double quantization),
    offload=N (model.offload_blocks), keep=N (train.keep_activations), bf16 / fp8 (model.quantization "none" /
    "fp8"), fp8mm=widening (fluxnb.model.fp8.FP8_MATMULS: FP8 matmuls only in the widening layers), adamw (plain
    AdamW), cap=GiB, nf4=PATH (model.prequantized: a save_nf4 folder, loads in seconds), t4k (attention only
    through a T4's kernels, memory-efficient and math: fluxnb.run.hardware.limit_attention_kernels), expand /
    noexpand (PyTorch's expandable_segments on / off: worker_env; without either, fluxnb's default: on,
    fluxnb.run.hardware.use_expandable_segments), profile, outer (gradient checkpointing around each block's call,
    as diffusers' own and fluxnb's before 2026-12-02, instead of inside its forward), offinputs (the forward's saved
    tensors of offmin=MiB or more, default 8, wait in pinned CPU memory: benchmarks/offload_inputs.py), amb=F
    (torch._functorch.config.activation_memory_budget: the compiled blocks' partitioner keeps that fraction of
    their activations; with nockpt). `plan`: the settings fluxnb.train.budget chose (impl option budget=GiB), which
    win."""
    from fluxnb.config import LoRAConfig, ModelConfig, TrainConfig
    from fluxnb.run.hardware import Hardware, cuda_info
    from fluxnb.model import lora
    from fluxnb.model.quant import load_transformer
    from fluxnb.train import speed
    from fluxnb.train.step import make_optimizer

    hw = Hardware("real", torch.device("cuda"), dtype, cuda_info(), "benchmark")
    if "fp8mm" in opts:
        from fluxnb.model import fp8

        if opts["fp8mm"] not in fp8.FP8_MATMUL_CHOICES:
            raise SystemExit(f"fp8mm={opts['fp8mm']}: one of {fp8.FP8_MATMUL_CHOICES}")
        fp8.FP8_MATMULS = opts["fp8mm"]
    quantization = "fp8" if "fp8" in opts else "none" if "bf16" in opts else "nf4"
    plan = plan or {"model": {}, "train": {}}
    model = ModelConfig(model_id=str(ckpt), double_quant="dq" in opts, prequantized=opts.get("nf4"),
                        **({"quantization": quantization, "offload_blocks": int(opts.get("offload", 0))}
                           | plan["model"]))  # the plan's choices win (it names the quantization too)
    compile_mode = "off" if "nocompile" in opts else "on" if "compile" in opts else "auto"
    train = TrainConfig(**({"gradient_checkpointing": "nockpt" not in opts, "compile": compile_mode,
                            "keep_activations": int(opts.get("keep", 0)),
                            "optimizer": "adamw" if "adamw" in opts else "adamw8bit"} | plan["train"]))
    transformer = load_transformer(model, hw)
    lora.add_lora(transformer, LoRAConfig(), seed=0)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if "amb" in opts:  # read when the blocks compile, at their first call
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = float(opts["amb"])
    speed.configure(transformer, model, train, hw)
    if "outer" in opts:
        checkpoint_around_calls(transformer)
    return transformer, make_optimizer(params, train), params, (model, train, hw)


def checkpoint_around_calls(transformer) -> None:
    """fluxnb's checkpointing before 2026-12-02: the blocks fluxnb.train.speed checkpoints inside their forward,
    checkpointed instead around their call (fluxnb.train.speed.set_checkpointing's `around`), compiled with
    torch.compile's default partition."""
    from fluxnb.train import speed
    from fluxnb.model.offload import transformer_blocks

    blocks = transformer_blocks(transformer)
    speed.set_checkpointing(transformer, [b for b in blocks if speed.is_checkpointed(b)], around=True)
    for block in blocks:
        if block._compiled_call_impl is not None:
            speed.compile_block(block)


def fluxnb_step(transformer, batch, scheduler, dtype, _state={}):  # noqa: B006 - built once per process
    """fluxnb's training step on `batch` (make_inputs'), collated as fluxnb.train feeds it: the embeddings in
    `dtype`, as the reference's script casts them too. Until 2026-12-03 they went in as fp32, and bitsandbytes'
    NF4 layers, which return their input's dtype even under autocast, carried the text tokens and every
    single-stream block in fp32 (FP8 and 16-bit layers return autocast's dtype: those rows ran bf16)."""
    from fluxnb.config import TrainConfig
    from fluxnb.train import flow
    from fluxnb.train.batches import TrainingData
    from fluxnb.train.step import LatentScale, training_step

    if not _state:
        _state |= {"table": flow.NoiseTable.from_scheduler(scheduler), "cfg": TrainConfig(),
                   "latent": LatentScale(FLUX_VAE.shift_factor, FLUX_VAE.scaling_factor, 8),
                   "generator": torch.Generator().manual_seed(0)}
    shared = {"text_ids": batch["text_ids"]}  # one (L, 3) for every caption
    items = [{k: v[i] for k, v in batch.items() if k not in shared} | shared for i in range(len(batch["latent_mean"]))]
    batch = TrainingData.collate(items, batch["latent_mean"].device, dtype)
    return training_step(transformer, batch, _state["table"], _state["cfg"], _state["latent"], _state["generator"], dtype)


def worker(impl: str, dtype_name: str, cases: list[str], ckpt: Path, warmup: int, steps: int,
           profile: bool = False, samples: int = 1) -> list[dict]:
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxnb.run.hardware import use_expandable_segments
    from fluxnb.base.memory import proc_status
    from fluxnb.model.offload import streamer_of

    dtype = DTYPES[dtype_name]
    opts = parse_impl(impl)
    # fluxnb.run.hardware.detect's allocator default (expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set, as
    # impl options expand / noexpand do); the reference recipe keeps PyTorch's default.
    expandable = impl != "reference" and use_expandable_segments()
    total = torch.cuda.get_device_properties(0).total_memory
    if "cap" in opts:  # emulate a smaller card: this process may allocate at most `cap` GiB
        torch.cuda.set_per_process_memory_fraction(float(opts["cap"]) * GiB / total)
    plan = None
    quantization = "fp8" if "fp8" in opts else "none" if "bf16" in opts else "nf4"
    if "budget" in opts:  # fluxnb.train.budget's plan for this budget at the first case's size (one case per run)
        from fluxnb.train.budget import choose

        width, height, tokens, _ = CASES[cases[0]]
        chosen = choose(float(opts["budget"]), width, height, tokens, compiled="nocompile" not in opts,
                        quantization=quantization)
        print(chosen.table(), flush=True)
        plan = chosen.settings()
        opts["batch"] = str(plan["train"]["batch_size"])
    batch_size = int(opts.get("batch", 1))
    if samples % batch_size:
        raise SystemExit(f"--samples {samples} is not a multiple of batch={batch_size}")
    micro_steps = samples // batch_size  # gradient accumulation, as the blog's 1 x 4
    if "t4k" in opts:  # a T4 has no flash or cuDNN attention: what its memory-efficient kernel keeps
        from fluxnb.run.hardware import GPUInfo, limit_attention_kernels

        limit_attention_kernels(GPUInfo("T4", (7, 5), 14.7))
    if "nocudnn" in opts:  # attention through flash / memory-efficient SDPA instead of cuDNN's
        torch.backends.cuda.enable_cudnn_sdp(False)
    if impl != "reference" and "cudnn" not in opts:  # fluxnb.train's attention kernels (fluxnb.train.speed)
        from fluxnb.train.speed import attention_backends

        # Held for the whole process: a context manager entered as a temporary is closed when it is garbage
        # collected, which undid the exclusion at once in every run before 2026-12-01 (cuDNN attention ran).
        _HELD.append(attention_backends(SimpleNamespace(device=torch.device("cuda")), quantization))
        _HELD[-1].__enter__()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if impl == "reference":
        transformer, optimizer, params = reference_setup(ckpt, dtype)
        step_fn = reference_step
    else:
        transformer, optimizer, params, configs = fluxnb_setup(ckpt, dtype, opts, plan)
        step_fn = fluxnb_step
    load_s = time.perf_counter() - t0
    accelerator = Accelerator(mixed_precision=dtype_name)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated() / GiB
    if plan is not None:  # the budget from here on (loading straight to CPU RAM is issue 13's: not capped here)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(float(opts["budget"]) * GiB / total)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    saved_tensors = contextlib.nullcontext
    if "offinputs" in opts:  # issue 25's item 2, before fluxnb has it: benchmarks/offload_inputs.py
        from offload_inputs import InputsToCPU

        hooks = InputsToCPU(int(float(opts.get("offmin", 8)) * 2**20))
        saved_tensors = lambda: hooks  # noqa: E731 - one side stream, entered once per micro-step
    after_load = torch.cuda.memory_allocated() / GiB
    rows = []
    for name in cases:
        width, height, tokens, _ = CASES[name]
        batches = [make_inputs(width, height, tokens, seed=k, batch=batch_size) for k in range(micro_steps)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, losses, grad_norms = [], [], []

        def one_step():  # one optimizer step: `samples` samples as micro_steps x batch_size
            for batch in batches:
                with saved_tensors():
                    loss = step_fn(transformer, batch, scheduler, dtype)
                accelerator.backward(loss / micro_steps)
                losses.append(loss.item())  # synchronises
            grad_norms.append(float(accelerator.clip_grad_norm_(params, 1.0)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        adjusted, counts_before = None, allocator_counts()
        for i in range(warmup + steps):
            if i == 1 and plan is not None and adjusted is None:  # the first step measured: fit the budget
                adjusted = fit_once(transformer, configs, tokens_of(name), None)
            if i == warmup:  # compile and allocator warm-up are over: the peak of the steady state from here
                torch.cuda.synchronize()
                warmup_peak = torch.cuda.max_memory_allocated() / GiB
                torch.cuda.reset_peak_memory_stats()
                counts_before = allocator_counts()
            start = time.perf_counter()
            try:
                one_step()
                out_of_memory = False
            except torch.cuda.OutOfMemoryError:
                if i or plan is None:
                    raise
                out_of_memory = True  # handled below, once the failed step's frames (and tensors) are gone
            if out_of_memory:  # the first step did not fit: one notch down (as if 1 GiB over), then again
                del losses[:], grad_norms[:]
                optimizer.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                adjusted = fit_once(transformer, configs, tokens_of(name), float(opts["budget"]) + 1)
                adjusted = {"after_out_of_memory": True, **(adjusted or {})}
                one_step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        peak, reserved = torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB
        counts = {k: v - counts_before[k] for k, v in allocator_counts().items()}  # over the timed steps
        streamer = streamer_of(transformer)  # its pinned CPU copies (fluxnb.model.offload)
        if profile or "profile" in opts:
            print_profile(one_step, f"{impl} {name}")
        if "offinputs" in opts:  # what moved to CPU RAM (shapes, each once) and how much per micro-step
            print(f"offinputs: {hooks.moved_bytes / max(hooks.passes, 1) / GiB:.2f} GiB per micro-step to CPU RAM; "
                  f"shapes {sorted(set(hooks.moved))}", flush=True)
        rows.append({"case": name, "impl": impl, "samples_per_step": samples, "batch_size": batch_size,
                     "s_per_step": statistics.median(times), "s_min": min(times),
                     "s_max": max(times), "peak_allocated_gib": peak,
                     "peak_reserved_gib": reserved, "after_load_gib": after_load, "load_peak_gib": load_peak,
                     "warmup_peak_gib": warmup_peak,
                     "load_s": load_s, "losses_finite": all(math.isfinite(x) for x in losses),
                     "last_loss": losses[-1], "grad_norms_finite": all(math.isfinite(g) for g in grad_norms),
                     "grad_norms": [round(g, 5) for g in grad_norms[:5]], "first_losses": losses[:micro_steps],
                     "plan": plan, "adjusted": adjusted,
                     "allocator_per_step": {k: v / max(steps, 1) for k, v in counts.items()},
                     "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                     "expandable_segments_by_fluxnb": expandable,
                     "host_gib": {k: round(v, 3) for k, v in proc_status().items()},
                     "pinned_arena_gib": round(streamer.arena.nbytes / GiB, 3) if streamer else None})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def allocator_counts() -> dict[str, int]:
    """PyTorch allocator events: retries (a request failed, every cached block was freed, and it tried again:
    what a budget at its edge costs) and the cudaMalloc / cudaFree calls behind them."""
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def tokens_of(case: str) -> int:
    width, height, tokens, _ = CASES[case]
    return (width // 16) * (height // 16) + tokens


def fit_once(transformer, configs, tokens: int, peak: float | None):
    """fluxnb.train.speed.fit_budget, as the training loop calls it after the first optimizer step."""
    from fluxnb.train import speed

    model, train, hw = configs
    fitted = speed.fit_budget(transformer, model, train, hw, tokens, peak)
    if fitted is None:
        return None
    return {"offload_blocks": fitted[0].offload_blocks, "keep_activations": fitted[1].keep_activations}


def print_profile(one_step, title: str) -> None:
    """Two steps under torch.profiler: GPU-busy time vs wall time (how much is launch/Python overhead), top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_step()
        one_step()
    wall = (time.perf_counter() - start) / 2
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # GPU-side events only
    copies = [e for e in kernels if "memcpy" in e.name.lower()]  # block streaming's, on a side stream: overlapped
    gpu = sum(e.device_time for e in kernels if "memcpy" not in e.name.lower()) / 2 / 1e6
    print(f"PROFILE {title}: wall {wall:.3f} s/step (profiled), GPU busy {gpu:.3f} s/step ({100 * gpu / wall:.0f}%) "
          f"computing, {sum(e.device_time for e in copies) / 2 / 1e6:.3f} s/step copying")
    families: dict[str, float] = {}  # which attention kernels really ran (cuDNN's are meant to be excluded)
    for e in kernels:
        name = e.name.lower()
        family = next((f for f in ("memcpy", "cudnn", "flash", "fmha", "efficient", "gemm", "kdequant", "optimizer",
                                   "adam")
                       if f in name), "other")
        families[family] = families.get(family, 0.0) + e.device_time / 2 / 1e6
    print(f"PROFILE families {title}: " + json.dumps({k: round(v, 4) for k, v in sorted(families.items())}))
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "diffusers", "transformers", "peft", "bitsandbytes", "accelerate", "torchao"]
    return {n: md.version(n) for n in names if _installed(n)} | {"cuda": torch.version.cuda or "", "python": sys.version.split()[0]}


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default="reference,fluxnb",
                        help="reference, fluxnb (its defaults on CUDA), fluxnb+OPT+...: see fluxnb_setup for OPTs")
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/flux-random"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1,
                        help="samples per optimizer step (the blog: 4 = batch 1 x 4 accumulation); impl option "
                             "batch=B runs them as samples/B micro-batches of B")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--commit", default="", help="the git commit of the code that runs (recorded in the results)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler summary per case")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.worker:
        rows = worker(*args.worker, cases, args.ckpt, args.warmup, args.steps, args.profile, args.samples)
        print("RESULT " + json.dumps(rows))
        return

    from fullsize import build

    build(args.ckpt)
    rows = []
    for impl in args.impls.split(","):
        for dtype_name in sorted({CASES[c][3] for c in cases}):
            mine = [c for c in cases if CASES[c][3] == dtype_name]
            cmd = [sys.executable, __file__, "--worker", impl, dtype_name, "--cases", ",".join(mine), "--ckpt",
                   str(args.ckpt), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--samples", str(args.samples)] + ["--profile"] * args.profile
            proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(impl))
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not result:
                print(f"{impl}/{dtype_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
                continue
            print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
            rows += json.loads(result[-1][len("RESULT "):])
            print(f"{impl}/{dtype_name}: done", flush=True)
            write_report(args, cases, rows, quiet=True)
    write_report(args, cases, rows)


def worker_env(impl: str) -> dict[str, str]:
    """The worker's environment: impl options expand / noexpand set PyTorch's expandable_segments (read when CUDA
    starts, so it has to be in the environment of the process)."""
    opts = parse_impl(impl)
    env = dict(os.environ)
    if "expand" in opts or "noexpand" in opts:
        env["PYTORCH_CUDA_ALLOC_CONF"] = f"expandable_segments:{'True' if 'expand' in opts else 'False'}"
    return env


def write_report(args, cases: list[str], rows: list[dict], quiet: bool = False) -> None:
    table = []
    # List "reference" twice (first and last) to bracket the machine's drift. A speed-up counts against the FASTER
    # bracket (its median s/step, the smaller): the reference drifted 2.7-4.1 s between runs, and the mean of a
    # slow pair flattered fluxnb (issue 25). The mean's ratio is kept beside it, for comparing with older reports.
    for case in cases:
        refs = [r for r in rows if r["case"] == case and r["impl"] == "reference"]
        for impl in dict.fromkeys(i for i in args.impls.split(",") if i != "reference"):
            mine = [r for r in rows if r["case"] == case and r["impl"] == impl]
            if refs and mine:
                ref_s, fast = statistics.mean(r["s_per_step"] for r in refs), min(r["s_per_step"] for r in refs)
                table.append({"name": case, "impl": impl, "ref_s_per_step": round(ref_s, 4),
                              "ref_runs_s": [round(r["s_per_step"], 4) for r in refs],
                              "ref_runs_min_median_max_s": [[round(r[k], 4) for k in ("s_min", "s_per_step", "s_max")]
                                                            for r in refs],
                              "fluxnb_s_per_step": round(mine[0]["s_per_step"], 4),
                              "fluxnb_min_median_max_s": [round(mine[0][k], 4) for k in ("s_min", "s_per_step", "s_max")],
                              "speedup": round(fast / mine[0]["s_per_step"], 3),  # against the faster bracket
                              "speedup_vs_mean_ref": round(ref_s / mine[0]["s_per_step"], 3),
                              "ref_peak_gib": round(refs[0]["peak_allocated_gib"], 3),
                              "fluxnb_peak_gib": round(mine[0]["peak_allocated_gib"], 3)})
    device = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    report = {"commit": args.commit, "device": device, "date": date, "versions": versions(), "command": " ".join(sys.argv),
              "cases": table, "raw": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date}-{device.replace(' ', '_')}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    if quiet:
        return
    print(f"\n{'case':<22}{'impl':<28}{'ref s (runs)':>16}{'fluxnb s':>10}{'speedup':>9}{'ref GiB':>9}{'fluxnb GiB':>11}")
    for r in table:  # speedup: against the faster reference run
        runs = "/".join(f"{x:.2f}" for x in r["ref_runs_s"])
        print(f"{r['name']:<22}{r['impl']:<28}{runs:>16}{r['fluxnb_s_per_step']:>10.3f}"
              f"{r['speedup']:>9.2f}{r['ref_peak_gib']:>9.2f}{r['fluxnb_peak_gib']:>11.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
