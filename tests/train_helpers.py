"""Test helper: a run directory with caches made straight from the tiny pipeline (no notebooks 01/02 needed).

It writes exactly the run-directory contract of fluxnb.data: samples.jsonl, embeddings/<caption_id> from
`FluxPipeline.encode_prompt` (captions, validation prompts and the empty prompt), latents/<sample_id> = the VAE's posterior mean and
std, each file tagged with the settings fingerprint of the tiny run's config, and both meta.json files. Images keep
their own sizes (all multiples of 16 in the tiny dataset), so there are several buckets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxnb.config import RunConfig
from fluxnb.data import embeddings, latents
from fluxnb.data.store import Sample, caption_id, fingerprint, sample_id, write_meta, write_samples
from fluxnb.run import Run, RunDir, open_run

_CACHE: dict[str, Path] = {}


@torch.no_grad()
def _build_caches(config: RunConfig, out: RunDir) -> None:
    from diffusers import FluxPipeline

    model_dir, dataset_dir = Path(config.model.model_id), Path(config.data.dataset)
    prompts = config.data.validation_prompts
    latent_tag, text_tag = fingerprint(latents.settings(config)), fingerprint(embeddings.settings(config))
    pipe = FluxPipeline.from_pretrained(model_dir, transformer=None, dtype=torch.float32)
    rows = [json.loads(line) for line in (dataset_dir / "metadata.jsonl").read_text().splitlines() if line]
    samples = []
    for row in rows:
        raw = (dataset_dir / row["file_name"]).read_bytes()
        image = Image.open(dataset_dir / row["file_name"]).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
        dist = pipe.vae.encode(pixels[None]).latent_dist
        sid = sample_id(raw, row["text"])
        sample = Sample(sid, row["text"], caption_id(row["text"]), row["file_name"], image.width, image.height)
        latents.save_latent(out, sample, dist.mean[0], dist.std[0], latent_tag)
        samples.append(sample)
    for text in {s.caption for s in samples} | set(prompts) | {embeddings.EMPTY_PROMPT}:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, max_sequence_length=77)
        embeddings.save_embedding(out, text, embeds[0], pooled[0], text_ids, text_tag)
    write_meta(out.latents, latents.settings(config))
    write_meta(out.embeddings, embeddings.settings(config))
    write_samples(out, samples)


def make_run(run_dir: Path, tmp_factory, **overrides) -> Run:
    """A tiny-profile run in `run_dir` with filled caches; `overrides` are config sections (train={...})."""
    run = open_run(run_dir, profile="tiny", verbose=False)
    key = str(run.config.model.model_id)
    if key not in _CACHE:  # encode once per session, copy for each test
        cache_root = Path(tmp_factory.mktemp("tiny-caches"))
        _build_caches(run.config, RunDir(cache_root))
        _CACHE[key] = cache_root
    for name in ("embeddings", "latents"):
        shutil.copytree(_CACHE[key] / name, run.dir.root / name, dirs_exist_ok=True)
    shutil.copy(_CACHE[key] / "samples.jsonl", run.dir.samples_file)
    if overrides:
        run.config = run.config.replace(**overrides)
        run.save()
    return run
