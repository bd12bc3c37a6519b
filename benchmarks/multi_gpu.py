"""Samples per second of `accelerate launch -m fluxnb train` on 1 and on N GPUs of one machine (issue: scale out).

The real CLI and training loop on a full-size random-weight FLUX.1-dev transformer (benchmarks/fullsize.py), over
caches of random latents (512x768) and T5/CLIP embeddings written through fluxnb's own cache owners, so that
nothing but the time is fake. Each process count trains `--warmup` steps (torch.compile happens there) and then
`--steps` timed ones; samples/s = samples per step x timed steps / their seconds (metrics.jsonl).

    python benchmarks/multi_gpu.py --gpus 1 2            # -> benchmarks/results/<date>-multi-gpu.json
    python benchmarks/multi_gpu.py --tiny --gpus 1 2     # the same plumbing on the CPU with the tiny model
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from fluxnb.config import RunConfig  # noqa: E402
from fluxnb.data import embeddings, latents  # noqa: E402
from fluxnb.data.store import Sample, caption_id, fingerprint, write_meta, write_samples  # noqa: E402
from fluxnb.run import RunDir  # noqa: E402

FLUX_VAE_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
                   "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "scaling_factor": 0.3611,
                   "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
                   "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                         "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                         "base_image_seq_len": 256, "max_image_seq_len": 4096}


def model_folder(out: Path, tiny: bool) -> Path:
    """A diffusers folder training can load: the transformer, the VAE's and scheduler's configs (no VAE weights:
    training reads only the VAE's config when sample grids are off)."""
    if tiny:
        from fluxnb.tiny.flux import ensure_tiny

        return ensure_tiny().model
    from fullsize import build

    root = out / "model"
    build(root)
    for sub, config, name in (("vae", FLUX_VAE_CONFIG, "config.json"),
                              ("scheduler", FLUX_SCHEDULER_CONFIG, "scheduler_config.json")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps(config))
    return root


def make_run(root: Path, model: Path, samples: int, width: int, height: int, batch: int, steps: int) -> RunDir:
    """RUN/config.json + samples.jsonl + random caches, valid for fluxnb's checks (same settings fingerprints)."""
    run = RunDir(root)
    config = RunConfig(profile="tiny" if "tiny" in str(model) else "real").replace(
        data={"dataset": str(root / "no-dataset"), "width": width, "height": height},
        model={"model_id": str(model)},
        train={"batch_size": batch, "gradient_accumulation_steps": 1, "max_train_steps": steps, "sample_every": 0,
               "checkpoint_every": 0, "compile": "auto"})
    config.save(root)
    g = torch.Generator().manual_seed(0)
    e_tag, l_tag = fingerprint(embeddings.settings(config)), fingerprint(latents.settings(config))
    write_meta(run.embeddings, embeddings.settings(config))
    write_meta(run.latents, latents.settings(config))
    dim, pooled = (4096, 768) if config.profile == "real" else (32, 32)  # T5 width, CLIP width
    rows = []
    for i in range(samples):
        caption = f"random sample {i}"
        sample = Sample(f"{i:016x}", caption, caption_id(caption), f"row {i}", width, height)
        embeddings.save_embedding(run, caption, torch.randn(77, dim, generator=g), torch.randn(pooled, generator=g),
                                  torch.zeros(77, 3), e_tag)
        latents.save_latent(run, sample, torch.randn(16, height // 8, width // 8, generator=g),
                            0.05 * torch.rand(16, height // 8, width // 8, generator=g), l_tag)
        rows.append(sample)
    write_samples(run, rows)
    return run


def samples_per_second(run: RunDir, warmup: int, per_step: int) -> float:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
    timed = rows[warmup:]
    return per_step * len(timed) / (timed[-1]["seconds"] - rows[warmup - 1]["seconds"])


def launch(run: RunDir, gpus: int, tiny: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = ["--multi_gpu"] if gpus > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(gpus),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "fluxnb", "train", "--run-dir", str(run.root), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=4, help="samples per GPU per step")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the plumbing)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fluxnb-multi-gpu"))
    args = parser.parse_args()
    width, height = (64, 96) if args.tiny else (512, 768)
    model = model_folder(args.out, args.tiny)
    results = []
    for gpus in args.gpus:
        samples = args.batch * gpus * (args.warmup + args.steps)  # one epoch: every step full
        run = make_run(args.out / f"run-{gpus}", model, samples, width, height, args.batch, args.warmup + args.steps)
        launch(run, gpus, args.tiny)
        rate = samples_per_second(run, args.warmup, args.batch * gpus)
        results.append({"gpus": gpus, "batch_per_gpu": args.batch, "samples_per_second": round(rate, 3)})
        print(f"{gpus} GPU(s): {rate:.2f} samples/s", flush=True)
    one = next((r["samples_per_second"] for r in results if r["gpus"] == 1), None)
    for r in results:
        r["speedup_vs_1"] = round(r["samples_per_second"] / one, 3) if one else None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    record = {"date": dt.date.today().isoformat(), "device": device, "torch": torch.__version__,
              "command": " ".join(sys.argv), "size": f"{width}x{height}", "results": results}
    out = ROOT / "benchmarks" / "results" / f"{record['date']}-multi-gpu{'-tiny' if args.tiny else ''}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
