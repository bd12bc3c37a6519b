"""Rehearse the five notebooks at full size inside a T4's, an 8 GB card's and a 4090's limits (GPU machine).

    python benchmarks/rehearsal.py --root /tmp/rehearsal --out results.json --envelopes t4 8gb 4090
    python benchmarks/rehearsal.py ... --envelopes 8gb 4090 --parallel     # both at once (a GPU each if there
                                                                            # are enough, else sharing one)
    python benchmarks/rehearsal.py --quick --parallel --commit SHA ...     # notebook 03 only, 5 steps, ~6 min
    python benchmarks/rehearsal.py --resume --notebooks 04 05 ...           # the same run dirs, a second call

1. benchmarks/fullsize.py builds a random-weight FLUX.1-dev pipeline (FLUX.1-dev's layout and sizes) and a
   24-image dataset; the NF4 transformer is saved once with fluxnb.model.quant.save_nf4 (what the t4-16gb preset
   tells a Colab user to do), in its own process.
2. Per envelope, a run directory is configured as a user would (config.json: the envelope's preset and dtype,
   model and dataset paths, 30 optimizer steps at 512x768, 2 validation prompts), then each notebook runs in the
   same headless runner as `python -m fluxnb notebooks --only NN`, in a fresh process per notebook, with
     FLUXNB_GPU_MEMORY_GIB   the envelope's GPU size (fluxnb.run.hardware caps PyTorch's allocator to it),
     FLUXNB_PEAKS_FILE       where the kernel writes its own peaks (fluxnb.base.memory.start_peak_log),
     FLUXNB_GPU_CAPABILITY   (t4) a T4's compute capability, 7.5: fp16, no torch.compile, and attention through
                             the kernels a T4 has (memory-efficient, math), as fluxnb.run.hardware derives them,
     FLUXNB_WATCH_DTYPE      (t4) bfloat16: the kernel counts operations that make a bf16 tensor (none should),
     a cgroup v2 memory limit (memory.max, no swap) around the runner and its kernel where /sys/fs/cgroup is
     writable; else FLUXNB_HOST_MEMORY_GIB and a check of the recorded peak against the limit afterwards.
3. Results (per envelope and notebook: wall time, GPU peaks, host RssAnon / RssFile peaks, disk written, the
   training's s/step, what 04 rendered and merged) go to --out after every notebook, so a timeout keeps them.

Every image trains at 512x768 (data.buckets off) unless --buckets: the 24-image dataset's buckets would be
512x768, 768x512, 576x640 and 512x704, none with more tokens than 512x768 (1536), so the memory peaks are
those of its largest shape either way, while each extra shape costs every compiled envelope 2-3 minutes of
compilation on the shared GPU (one device call could not hold the full series then).

--kontext: the same with model.base = FLUX.1-Kontext-dev (the same random model: Kontext-dev has FLUX.1-dev's
components and sizes) on the paired dataset fullsize.py draws (root/flux/pairs: each target's control at its
size, instructions as captions), the training controls as validation inputs; run directories run-kontext-<envelope>.
Each sample then carries its control's 1536 tokens besides its own: what the envelopes' memory is measured for.

--quick: notebook 03 alone, 5 optimizer steps, its inputs made by the CLI (embed, latents): the rehearsal every
change to training, the planner, the loaders, inference or notebooks 03-04 runs before it lands. Every results
file records the commit it ran (--commit) and, per envelope, "passed".

The GPU's memory, its compute capability (t4) and the host memory are emulated, not the GPU's speed: the H200's
kernels run faster than a T4's (see BENCHMARKS.md for the T4 time estimate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from fluxnb.infer.merged import MERGE_INFO  # noqa: E402  (after the path)

ENVELOPES = {  # DESIGN.md "Envelopes"
    "t4": dict(gpu_gib=14.7, host_gib=11.5, dtype="auto", preset="t4-16gb", prequantized=True, capability="7.5",
               watch_dtype="bfloat16"),
    "8gb": dict(gpu_gib=7.6, host_gib=14.0, dtype="bf16", preset="8-12gb", prequantized=True),
    "4090": dict(gpu_gib=23.6, host_gib=28.0, dtype="bf16", preset="4090-24gb", prequantized=False),
}
NOTEBOOKS = ["01", "02", "03", "04", "05"]
PROMPTS = ["a cat sleeping on a blue chair, tnyst style", "a castle on a hill at night, tnyst style"]
KONTEXT_PROMPTS = ["make it tnyst style", "turn this drawing into tnyst style"]  # on the first pairs' controls
STEPS = 30
QUICK_STEPS = 5


def configure(run_dir: Path, env: dict, model: Path, dataset: Path, nf4: Path, steps: int = STEPS,
              buckets: bool = True, kontext: bool = False) -> None:
    """config.json as a user would set it: dataset and model (notebook 01), then the envelope's preset, dtype and
    (t4, 8gb) the pre-quantized NF4 (notebook 03). The preset's plan is made for the envelope's machine (its GPU
    size and compute capability) and the base (Kontext: each sample's control tokens too), as 03's form makes it."""
    from fluxnb.config import KONTEXT, RunConfig
    from fluxnb.train import presets

    config = RunConfig(profile="real").replace(
        data={"dataset": str(dataset), "width": 512, "height": 768, "validation_prompts": KONTEXT_PROMPTS if kontext
              else PROMPTS, "buckets": buckets},
        model={"model_id": str(model), "dtype": env["dtype"], "prequantized": str(nf4) if env["prequantized"] else None,
               **({"base": KONTEXT} if kontext else {})},
        train={"max_train_steps": steps, "sample_every": steps, "checkpoint_every": steps})
    presets.apply(config, env["preset"], envelope_hardware(env)).save(run_dir)


def envelope_env(env: dict) -> dict[str, str]:
    """The environment variables that make fluxnb see the envelope's GPU (fluxnb.run.hardware, fluxnb.base.memory)."""
    return {"FLUXNB_GPU_MEMORY_GIB": str(env["gpu_gib"]),
            **({"CUDA_VISIBLE_DEVICES": str(env["gpu"])} if "gpu" in env else {}),
            **({"FLUXNB_GPU_CAPABILITY": env["capability"]} if "capability" in env else {}),
            **({"FLUXNB_WATCH_DTYPE": env["watch_dtype"]} if "watch_dtype" in env else {})}


def envelope_hardware(env: dict):
    """The machine fluxnb.run.hardware.detect sees inside the envelope (this GPU, capped and as old as it says)."""
    import torch

    from fluxnb.run.hardware import GPUInfo, Hardware, cuda_info

    gpu = cuda_info()
    capability = tuple(int(x) for x in env["capability"].split(".")) if "capability" in env else gpu.capability
    seen = GPUInfo(gpu.name, capability, env["gpu_gib"])
    return Hardware("real", torch.device("cuda"), torch.bfloat16 if seen.has_bf16 else torch.float16, seen, "envelope")


def prepare_by_cli(run_dir: Path, env: dict, log: Path, deadline: float, steps=("embed", "latents", "train")) -> None:
    """The inputs of notebooks 04-05 made by the CLI (notebooks 01-03's headless mirror) instead of the notebooks:
    only for --start-at 04, a machine where 01-03 already ran and were recorded, to save device time. The GPU is
    capped as the envelope's; host memory is not limited here (not a measurement)."""
    child_env = {**os.environ, **envelope_env(env)}
    with open(log, "a") as out:
        for step in steps:
            out.write(f"\n===== cli {step}\n")
            out.flush()
            subprocess.run([sys.executable, "-m", "fluxnb", step, "--run-dir", str(run_dir)], cwd=ROOT, check=True,
                           env=child_env, stdout=out, stderr=subprocess.STDOUT,
                           timeout=max(deadline - time.time(), 1))


def make_cgroup(name: str, limit_gib: float) -> tuple[Path | None, str]:
    """A cgroup v2 group with memory.max = limit and no swap, or (None, why not)."""
    base = Path("/sys/fs/cgroup")
    try:
        controllers = (base / "cgroup.subtree_control").read_text()
        if "memory" not in controllers:
            (base / "cgroup.subtree_control").write_text("+memory")
        group = base / name
        if group.exists():
            group.rmdir()
        group.mkdir()
        (group / "memory.max").write_text(str(int(limit_gib * 2**30)))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group, "enforced by cgroup v2 memory.max"
    except OSError as err:
        return None, f"no cgroup ({err.__class__.__name__}: {err}); peak RSS recorded and checked after the run"


def in_group(command: list[str], group: Path) -> list[str]:
    """`command`, started inside cgroup `group` (with all its children): a shell writes its own PID into the
    group, then execs the command. Not preexec_fn, which is unsafe in a process with threads (--parallel)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *command]


def du_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**30


def seconds_per_step(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(rows)]
    return {"steps": len(rows), "s_per_step_median": statistics.median(times) if times else None,
            "s_per_step_last10": statistics.mean(times[-10:]) if times else None,
            "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None}


def run_notebook(nb: str, run_dir: Path, env: dict, name: str, log: Path, timeout: float) -> dict:
    peaks_file = run_dir / f"peaks-{nb}.json"
    peaks_file.unlink(missing_ok=True)
    group, how = make_cgroup(f"fluxnb-{name}-{nb}", env["host_gib"])
    child_env = {**os.environ, **envelope_env(env), "FLUXNB_PEAKS_FILE": str(peaks_file),
                 "FLUXNB_RUN_DIR": str(run_dir)}
    if group is None:
        child_env["FLUXNB_HOST_MEMORY_GIB"] = str(env["host_gib"])
    command = [sys.executable, "-m", "fluxnb", "notebooks", "--run-dir", str(run_dir), "--only", nb,
               "--timeout", str(int(timeout))]
    if group is not None:
        command = in_group(command, group)
    disk_before, start, started_at = du_gib(run_dir), time.perf_counter(), time.time()
    with open(log, "a") as out:
        out.write(f"\n===== {name} {nb}\n")
        out.flush()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"notebook": nb, "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "host_limit": how,
              "disk_growth_mib": round((du_gib(run_dir) - disk_before) * 1024, 1)}
    for executed in (run_dir / "executed").glob(f"{nb}_*.ipynb"):  # beside the log: what the reader would see
        if executed.stat().st_mtime >= started_at:  # written by this run, not left from an earlier one
            shutil.copy(executed, log.parent / f"{name}-{executed.name}")
    if peaks_file.is_file():
        result["kernel"] = {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in json.loads(peaks_file.read_text()).items()}
    if group is not None:
        for key in ("memory.peak", "memory.events"):
            if (group / key).exists():
                result[f"cgroup_{key}"] = (group / key).read_text().strip()
        try:
            group.rmdir()
        except OSError:
            pass
    k = result.get("kernel", {})
    result["gpu_ok"] = k.get("gpu_reserved_gib", 0) <= env["gpu_gib"]
    result["host_anon_ok"] = k.get("host_RssAnon_gib", 0) <= env["host_gib"]
    result["host_rss_ok"] = k.get("host_VmHWM_gib", 0) <= env["host_gib"]
    result["dtype_ok"] = k.get("watched_ops", 0) == 0  # t4: no bf16 tensor made
    result["ok"] = rc == 0 and result["gpu_ok"] and result["dtype_ok"] and (group is not None or result["host_anon_ok"])
    return result


def rehearse(report: dict, root: Path, model: Path, dataset: Path, nf4: Path, deadline: float, log: Path,
             save, mode: str = "full", notebooks: list[str] = NOTEBOOKS, buckets: bool = False,
             kontext: bool = False) -> dict:
    """Fill `report` (already in the results) with envelope report["envelope"]'s run. Every change to it goes
    through save(change), which makes it under the results' lock (--parallel: other threads serialise them).
    mode "full": a new run directory, `notebooks` in order; "quick": a new one, its embeddings and latents made
    by the CLI, then notebook 03 with QUICK_STEPS; "resume": those of `notebooks` that did not pass yet, in the run
    directory an earlier call left (the warm machine's /tmp), recorded beside that call's."""
    name = report["envelope"]
    env = {**ENVELOPES[name], **({"gpu": report["gpu"]} if "gpu" in report else {})}
    run_dir = root / f"run-{'kontext-' if kontext else ''}{name}"
    if mode != "resume":
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        save(lambda: report.update(env))
        quick = mode == "quick"  # buckets: see the module docstring
        configure(run_dir, env, model, dataset, nf4, steps=QUICK_STEPS if quick else STEPS, buckets=buckets,
                  kontext=kontext)
        save(lambda: report.update(buckets=buckets))
    if mode == "quick":
        start = time.perf_counter()
        prepare_by_cli(run_dir, env, log, deadline, steps=("embed", "latents"))
        save(lambda: report.update(prepared_by_cli={"steps": ["embed", "latents"],
                                                    "seconds": round(time.perf_counter() - start, 1)}))
        notebooks = ["03"]
    passed_before = {r["notebook"] for r in report["notebooks"] if r.get("ok")}
    for nb in notebooks:
        if mode == "resume" and nb in passed_before:
            continue  # an earlier call ran it: a second call takes up where the first stopped
        left = deadline - time.time()
        if left < 30:
            save(lambda nb=nb: report["notebooks"].append({"notebook": nb, "rc": "not run: out of device time"}))
            continue
        result = run_notebook(nb, run_dir, env, name, log, left)
        if nb == "03" and (run_dir / "metrics.jsonl").is_file():
            result["training"] = seconds_per_step(run_dir)
            result["lora_saved"] = (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
        if nb == "04":
            result["base_vs_lora_png"] = (run_dir / "samples" / "base_vs_lora.png").is_file()
            merged = run_dir / "merged"
            info = merged / "transformer" / MERGE_INFO  # written last by the merge, beside its weights
            result["merged"] = json.loads(info.read_text()) if info.is_file() else None
            if (merged / "transformer").is_dir():
                result["merged_gib"] = round(du_gib(merged / "transformer"), 3)
        save(lambda result=result: report["notebooks"].append(result))
        print(f"{name} {nb}: {json.dumps(result)}", flush=True)
        if result["rc"] != 0:
            break
    latest = {r["notebook"]: r for r in report["notebooks"]}  # a notebook run again counts by its last run
    expected = ["03"] if mode == "quick" or report.get("quick") else NOTEBOOKS
    save(lambda: report.update(passed=all(latest.get(nb, {}).get("ok") for nb in expected)))
    if "05" in notebooks:
        shutil.rmtree(run_dir / "merged", ignore_errors=True)  # 6.7 GB each (one per envelope running at once)
    return report


def prepare(root: Path, log: Path, pairs: bool = False) -> dict:
    """Build the pipeline + dataset (pairs: and the paired one) and the pre-quantized NF4 transformer, each in its
    own process, timed; what a warm machine's /tmp already holds is kept (fullsize.py's builds skip it)."""
    setup = {}
    start = time.perf_counter()
    code = f"import fullsize; fullsize.build_pipeline(__import__('pathlib').Path({str(root / 'flux')!r}), pairs={pairs})"
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", check=True, stdout=out, stderr=out,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    setup["build_s"] = round(time.perf_counter() - start, 1)
    nf4 = root / "flux-nf4"
    start = time.perf_counter()
    code = ("from fluxnb.config import ModelConfig; from fluxnb.run.hardware import detect; from fluxnb.model import quant; "
            "import torch, resource; "
            f"t = quant.load_transformer(ModelConfig(model_id={str(root / 'flux' / 'model')!r}), detect('real')); "
            f"quant.save_nf4(t, {str(nf4)!r}); "
            "print('nf4 load+save: gpu peak', torch.cuda.max_memory_allocated() / 2**30, 'GiB, max rss', "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'GiB')")
    if not (nf4 / "config.json").is_file():
        with open(log, "a") as out:
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=out, stderr=out)
    setup["nf4_s"] = round(time.perf_counter() - start, 1)
    setup["model_gib"] = round(du_gib(root / "flux" / "model"), 2)
    setup["nf4_gib"] = round(du_gib(nf4), 2)
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/rehearsal"))
    parser.add_argument("--out", type=Path, required=True, help="the results JSON (--resume reads and extends it)")
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--envelopes", nargs="+", default=list(ENVELOPES), choices=list(ENVELOPES))
    parser.add_argument("--notebooks", nargs="+", default=NOTEBOOKS, choices=NOTEBOOKS)
    parser.add_argument("--commit", default="", help="the git commit of the code that runs (recorded; required)")
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting notebooks after this many seconds")
    parser.add_argument("--quick", action="store_true",
                        help=f"notebook 03 alone, {QUICK_STEPS} optimizer steps, its inputs made by the CLI")
    parser.add_argument("--resume", action="store_true",
                        help="run --notebooks in the run directories and results an earlier call left (warm machine)")
    parser.add_argument("--buckets", action="store_true", help="aspect-ratio buckets on (default off: see above)")
    parser.add_argument("--kontext", action="store_true", help="model.base FLUX.1-Kontext-dev on the paired dataset")
    parser.add_argument("--parallel", action="store_true",
                        help="run the envelopes at the same time on the one GPU (each capped, its own cgroup and log): "
                             "the same caps and limits, longer wall times; cgroup peaks can differ, as cached file "
                             "pages count in the group that read them first")
    args = parser.parse_args()
    if not args.commit:
        parser.error("--commit: the git commit this code is (git rev-parse HEAD where it was sent from)")
    deadline = time.time() + args.budget_s
    args.root.mkdir(parents=True, exist_ok=True)
    log = args.log or args.out.with_suffix(".log")
    mode = "resume" if args.resume else "quick" if args.quick else "full"
    import torch

    from fluxnb.config import KONTEXT, ModelConfig

    call = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    base = KONTEXT if args.kontext else ModelConfig.base  # what configure() sets; results before --kontext: the default
    if args.resume:
        results = json.loads(args.out.read_text())
        if results.get("commit") != args.commit:
            parser.error(f"--resume: {args.out} ran commit {results.get('commit')}, not {args.commit}")
        if results.get("base", ModelConfig.base) != base:
            parser.error(f"--resume: {args.out} rehearsed {results.get('base')}: resume it with"
                         f"{'out' if args.kontext else ''} --kontext")
    else:
        results = {"commit": args.commit, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "quick": args.quick, "base": base,
                   "calls": [], "envelopes": []}
    results["calls"].append(call)

    lock = threading.Lock()

    def save(change=None) -> None:
        """Apply `change` to the results (if any) and write them, both under the lock."""
        with lock:
            if change is not None:
                change()
            args.out.write_text(json.dumps(results, indent=1) + "\n")

    if not args.resume:
        setup = prepare(args.root, log, pairs=args.kontext)
        save(lambda: results.update(setup=setup, parallel=args.parallel))
        print("setup:", results["setup"], flush=True)
    threads = []
    # --parallel on a machine with a GPU per envelope: each envelope on its own (no time-sharing of one GPU)
    own_gpu = args.parallel and torch.cuda.device_count() >= len(args.envelopes)
    for index, name in enumerate(args.envelopes):
        report = next((r for r in results["envelopes"] if r["envelope"] == name), None)
        if report is None:
            report = {"envelope": name, "quick": args.quick, "notebooks": []}
            save(lambda report=report: results["envelopes"].append(report))
        if own_gpu:
            save(lambda report=report, index=index: report.update(gpu=index))
        own_log = log.with_name(f"{log.stem}-{name}{log.suffix}") if args.parallel else log

        def run(report=report, own_log=own_log) -> None:
            try:
                dataset = args.root / "flux" / ("pairs" if args.kontext else "dataset")
                rehearse(report, args.root, args.root / "flux" / "model", dataset, args.root / "flux-nf4", deadline,
                         own_log, save, mode, args.notebooks, args.buckets, args.kontext)
            except Exception as err:  # recorded, so one envelope's failure neither vanishes nor stops the others
                error = f"{type(err).__name__}: {err}"
                save(lambda: report.update(passed=False, error=error))

        if args.parallel:
            threads.append(threading.Thread(target=run, name=name))
            threads[-1].start()
        else:
            run()
    for thread in threads:
        thread.join()
    free = shutil.disk_usage(args.root).free
    save(lambda: call.update(disk_free_gib_at_end=round(free / 2**30, 1)))
    for report in results["envelopes"]:
        print(f"{report['envelope']}: passed={report.get('passed')} "
              + " ".join(f"{r['notebook']}:{'ok' if r.get('ok') else r.get('rc')}" for r in report["notebooks"]))


if __name__ == "__main__":
    main()
