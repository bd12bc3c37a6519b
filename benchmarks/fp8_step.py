"""The FP8 training step (fluxnb.model.fp8) against the NF4 and bf16 steps, on the GPU machine: numbers, then time.

Full-size random FLUX.1-dev (benchmarks/fullsize.py builds it: time, memory and the matmuls' rounding are real,
image quality is not). Needs compute capability 8.9 or newer (H100/H200, RTX 40, L4).

    python benchmarks/fp8_step.py                        # all three parts -> benchmarks/results/<date>-<device>-fp8*.json
    python benchmarks/fp8_step.py --parts numerics       # one step's loss and LoRA gradients: fp8 and nf4 vs bf16
    python benchmarks/fp8_step.py --parts layers         # the layer alone at FLUX's shapes: error, TFLOP/s
    python benchmarks/fp8_step.py --parts time --impls reference,fluxnb+batch=4+fp8+budget=23.6,reference

numerics: each format in its own process (the bf16 model alone is 23.8 GB): fluxnb's load, LoRA r4 on the
  attention (B set to small random values, as tests/model_helpers.py does, so A's gradients exist too), eager
  blocks, bf16 autocast as in training, then `--batches` micro-batches of 4 samples at 512x768 with the same
  inputs, noise and timesteps in every process (benchmarks/train_step.py's make_inputs and fluxnb_step). The
  LoRA gradients are summed over them. Compared with bf16 ("none"): each loss, the gradients (relative error of
  all of them together, cosine, the worst tensor), and the memory after load (FP8's resident weights: 11.2 GiB
  planned, fluxnb.train.budget.resident_gib). --formats: fp8, fp8w (FP8 matmuls only where the layer widens), nf4.
layers: Fp8Linear against bf16 nn.Linear at FLUX's Linear shapes, M = 4 x 1613 tokens: relative error of the
  output and of the input gradient against an fp32 matmul, with the forward's fast accumulation on (--accum both:
  and off; fluxnb.model.fp8.FORWARD_FAST_ACCUM), and the time of forward + backward, eager and compiled (compiled,
  the per-row quantization fuses into the kernels around the matmul); "fp8w": the shape as FP8_MATMULS =
  "widening" runs it (a shape whose output does not widen: its dequantized codes in a bf16 matmul).
time: benchmarks/train_step.py's workers, one process each, case nf4-512x768-bf16 (the name is the case's size;
  the impl picks the format), 4 samples per step; default impls: the reference, fluxnb NF4, FP8 and bf16 at batch
  4 with every block resident and recomputed, the reference again (the machine's drift).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# model.quantization (and fp8w: FP8 weights, FP8 matmuls only where the layer widens) -> train_step impl options
FORMATS = {"none": {"bf16": ""}, "fp8": {"fp8": ""}, "fp8w": {"fp8": "", "fp8mm": "widening"}, "nf4": {}}
TIME_IMPLS = "reference,fluxnb+batch=4,fluxnb+batch=4+fp8,fluxnb+batch=4+bf16,reference"
TOKENS = 4 * ((512 // 16) * (768 // 16) + 77)  # a batch of 4 at 512x768 with 77 text tokens: 6452
GiB = 2**30


def numerics_worker(quantization: str, ckpt: Path, batches: int, out: Path) -> None:
    """One format's step on fixed inputs: losses, summed LoRA gradients, memory -> `out` (torch.save)."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from train_step import FLUX_SCHEDULER, fluxnb_setup, fluxnb_step, make_inputs

    from fluxnb.train.speed import attention_backends

    opts = {"nocompile": ""} | FORMATS[quantization]  # eager blocks, all resident, recomputed
    transformer, _, params, _ = fluxnb_setup(ckpt, torch.bfloat16, opts)
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated() / GiB
    with torch.no_grad():  # B starts at zero; small random B makes A's gradients nonzero too
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.01)
    transformer.train()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    with attention_backends(SimpleNamespace(device=torch.device("cuda")), quantization):  # as training runs
        for k in range(batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                batch = make_inputs(512, 768, 77, seed=k, batch=4)
                loss = fluxnb_step(transformer, batch, scheduler, torch.bfloat16)
            loss.backward()
            losses.append(loss.item())
    grads = {n: p.grad.float().cpu() for n, p in transformer.named_parameters() if p.requires_grad}
    torch.save({"losses": losses, "grads": grads, "after_load_gib": after_load,
                "peak_gib": torch.cuda.max_memory_allocated() / GiB}, out)


def compare(results: dict[str, dict]) -> dict:
    """fp8 and nf4 against bf16: loss differences, gradient errors (all LoRA gradients as one vector)."""
    ref = results["none"]
    names = sorted(ref["grads"])
    flat = {q: torch.cat([r["grads"][n].flatten() for n in names]) for q, r in results.items()}
    report = {}
    for q, r in results.items():
        per_tensor = sorted(((r["grads"][n] - ref["grads"][n]).norm() / ref["grads"][n].norm()).item() for n in names)
        report[q] = {"losses": r["losses"], "after_load_gib": round(r["after_load_gib"], 3),
                     "peak_gib": round(r["peak_gib"], 3),
                     "loss_rel_diff": [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])],
                     "grad_rel_error": ((flat[q] - flat["none"]).norm() / flat["none"].norm()).item(),
                     "grad_cosine": torch.nn.functional.cosine_similarity(flat[q], flat["none"], dim=0).item(),
                     "grad_rel_error_median_tensor": per_tensor[len(per_tensor) // 2],
                     "grad_rel_error_worst_tensor": per_tensor[-1]}
    return report


def run_numerics(args) -> dict:
    results = {}
    for q in ["none"] + [f for f in args.formats.split(",") if f != "none"]:
        out = Path(f"/tmp/fp8_step-{q}.pt")
        cmd = [sys.executable, __file__, "--numerics-worker", q, str(out), "--ckpt", str(args.ckpt),
               "--batches", str(args.batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"numerics worker {q} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results[q] = torch.load(out)
    report = compare(results)
    for q, r in report.items():
        print(f"{q:>5}: losses {[round(x, 5) for x in r['losses']]}, loss rel diff {r['loss_rel_diff']}, grads rel "
              f"error {r['grad_rel_error']:.4f} (cosine {r['grad_cosine']:.5f}, worst tensor "
              f"{r['grad_rel_error_worst_tensor']:.3f}), after load {r['after_load_gib']:.2f} GiB", flush=True)
    return report


def _timed(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def layer_case(k: int, n: int, fast: bool) -> dict:
    """One FLUX shape: errors against fp32, forward + backward time of bf16 and FP8, eager and compiled."""
    from fluxnb.model import fp8

    fp8.FORWARD_FAST_ACCUM = fast
    linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fp8.Fp8Linear.from_linear(linear, torch.bfloat16)
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    x32 = x.detach().float().requires_grad_()
    y32 = torch.nn.functional.linear(x32, linear.weight.float(), linear.bias.float())
    y32.backward(g.float())
    row = {"k": k, "n": n, "fast_accum": fast}
    variants = [("bf16", linear, "all"), ("fp8", layer, "all")] + [("fp8w", layer, "widening")] * (n <= k)
    for name, module, matmuls in variants:  # fp8w: a shape that does not widen, as FP8_MATMULS = "widening" runs it
        fp8.FP8_MATMULS = matmuls
        torch._dynamo.reset()  # each compiles the same forwards afresh: past 8 recompiles dynamo runs them eager
        x.grad = None  # the timing below accumulates into it
        y = module(x)
        y.backward(g)
        row[f"{name}_out_rel_error"] = ((y.float() - y32).norm() / y32.norm()).item()
        row[f"{name}_grad_rel_error"] = ((x.grad.float() - x32.grad).norm() / x32.grad.norm()).item()
        x.grad = None
        for mode, fn in (("eager", module), ("compiled", torch.compile(module))):
            s = _timed(lambda fn=fn: fn(x).backward(g))  # forward + input gradient: 2 matmuls
            row[f"{name}_{mode}_tflops"] = round(2 * 2 * TOKENS * k * n / s / 1e12, 1)
    fp8.FORWARD_FAST_ACCUM, fp8.FP8_MATMULS = True, "all"
    return row


def run_layers(args) -> list[dict]:
    from fluxnb.train.budget import DOUBLE_LINEARS, SINGLE_LINEARS

    shapes = sorted(set(DOUBLE_LINEARS.values()) | set(SINGLE_LINEARS.values()))
    rows = [layer_case(k, n, fast) for k, n in shapes for fast in ((True, False) if args.accum == "both" else (True,))]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def run_time(args) -> dict:
    """benchmarks/train_step.py's main in a process of its own; its results file, read back."""
    tag = f"fp8{'-' + args.tag if args.tag else ''}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--cases", "nf4-512x768-bf16", "--samples", "4",
           "--impls", args.impls, "--ckpt", str(args.ckpt), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--tag", tag, "--commit", args.commit, "--out", str(args.out)]
    subprocess.run(cmd, check=True)
    path = max(args.out.glob(f"*-{tag}.json"), key=lambda p: p.stat().st_mtime)
    rows = json.loads(path.read_text())["raw"]
    by_impl = {r["impl"]: r for r in rows}
    print(f"\n{'impl':<34}{'s/step':>8}{'peak GiB':>10}")
    for impl, r in by_impl.items():
        print(f"{impl:<34}{r['s_per_step']:>8.3f}{r['peak_allocated_gib']:>10.2f}")
    return {"results_file": str(path), "s_per_step": {i: r["s_per_step"] for i, r in by_impl.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="numerics,layers,time", help="any of numerics, layers, time")
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/flux-random"))
    parser.add_argument("--batches", type=int, default=2, help="numerics: micro-batches of 4 samples")
    parser.add_argument("--formats", default="fp8,fp8w,nf4", help=f"numerics: compared with bf16; any of {list(FORMATS)}")
    parser.add_argument("--accum", default="fast", choices=["fast", "both"],
                        help="layers: the forward's fast accumulation on only, or on and off")
    parser.add_argument("--impls", default=TIME_IMPLS, help="time: benchmarks/train_step.py impls")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    parser.add_argument("--commit", default="", help="the git commit of the code that runs (recorded)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--numerics-worker", nargs=2, metavar=("QUANTIZATION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not set(args.formats.split(",")) <= set(FORMATS):
        parser.error(f"--formats {args.formats}: each one of {list(FORMATS)}")
    if args.numerics_worker:
        numerics_worker(args.numerics_worker[0], args.ckpt, args.batches, Path(args.numerics_worker[1]))
        return
    from fullsize import build
    from train_step import versions

    parts = args.parts.split(",")
    build(args.ckpt)
    report = {"commit": args.commit, "device": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
              "versions": versions(), "command": " ".join(sys.argv)}
    started = time.perf_counter()
    for part, fn in (("numerics", run_numerics), ("layers", run_layers), ("time", run_time)):
        if part in parts:
            report[part] = fn(args)
            write(args, report)
    print(f"fp8_step: done in {time.perf_counter() - started:.0f} s")


def write(args, report: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{report['date']}-{report['device'].replace(' ', '_')}-fp8-step{'-' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text((args.out / name).read_text())


if __name__ == "__main__":
    main()
