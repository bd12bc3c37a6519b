"""Notebooks 01-02: your images and captions, checked, then cached once as text embeddings and VAE latents.

    sources     where rows come from (a Hub dataset, a local folder)      -> Records
    checks      every row opened and judged before any model loads (check_dataset) -> CheckedDataset + DataReport
    captions    notebook 01: the missing captions of a folder, written into its metadata.jsonl
    captioner   notebook 01: the captioning model (Florence-2, Qwen-VL, BLIP), loaded and freed
    buckets     aspect-ratio buckets and the resize/crop into them
    store       samples.jsonl, content ids, cache meta and fingerprints
    embeddings  notebook 01: CLIP + T5 once per caption (owner of embeddings/)
    latents     notebook 02: the VAE once per image (owner of latents/)
    masks       masked loss: one grey mask per image, cached with its latent
    controls    FLUX.1-Kontext-dev: each pair's control image, checked, fitted like its target, cached with it
"""

from .checks import (
                     CheckedDataset,
                     DataError,
                     DataReport,
                     Item,
                     check_dataset,
                     progress_bar,
                     with_instance_prompt,
)
from .store import BrokenCacheFile, CacheMismatch, Sample, caption_id, read_samples, sample_id

__all__ = ["BrokenCacheFile", "CacheMismatch", "CheckedDataset", "DataError", "DataReport", "Item", "Sample", "caption_id",
           "check_dataset", "progress_bar", "read_samples", "sample_id", "with_instance_prompt"]
