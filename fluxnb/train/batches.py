"""What training reads: the two caches joined per sample, held in memory, served in a replayable order.

    data = TrainingData(run.dir, batch_size=4, seed=0)
    batch = data.batch(micro_step, device, dtype)     # micro-batch k of the run: a pure function of (seed, k)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection

import torch

from ..data import embeddings, latents
from ..data.store import read_samples
from ..errors import FluxnbError
from ..run import RunDir


class CachedDataset(torch.utils.data.Dataset):
    """The training set as cached by notebooks 01 and 02: one item per row of samples.jsonl.

    Each item joins a sample's latent with the embedding of its OWN caption through the ids in samples.jsonl,
    so the order in which a loader visits items cannot mix them up. Latents are the VAE's distribution
    (mean, std), unscaled; training draws a fresh sample from it every time (fluxnb.train.flow).
    """

    def __init__(self, run: RunDir | str) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.samples = read_samples(self.run)
        if not self.samples:
            raise FluxnbError(f"{self.run.samples} lists no samples: re-run notebook 01 on a non-empty dataset.")
        missing = [s.source for s in self.samples if not latents.latent_path(self.run, s.id).is_file()]
        if missing:
            raise FluxnbError(
                f"{len(missing)} of {len(self.samples)} samples have no cached latents (first: {missing[0]}): "
                "run notebook 02 (or `python -m fluxnb latents`) for this run."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        mean, std = latents.load_latent(self.run, sample.id)
        return {"id": sample.id, "caption": sample.caption, "latent_mean": mean, "latent_std": std,
                **embeddings.load_embedding(self.run, sample.caption)}


class TrainingData:
    """The cached training set, held in memory, served in a seeded order that a resumed run can replay.

    Micro-batch k of the run is a pure function of (seed, k): epoch e's order is a permutation seeded by
    (seed, e), and batches never mix aspect-ratio buckets (the latents of one batch must share a shape).
    """

    def __init__(self, run: RunDir, batch_size: int, seed: int, only: Collection[str] | None = None) -> None:
        dataset = CachedDataset(run)
        # only: the sample ids to serve (fluxnb.train.validation keeps held-out images out); None = all
        self.items = [dataset[i] for i in range(len(dataset)) if only is None or dataset.samples[i].id in only]
        self.batch_size, self.seed = batch_size, seed
        self.buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            self.buckets[tuple(item["latent_mean"].shape)].append(i)
        self.batches_per_epoch = sum(math.ceil(len(ix) / batch_size) for ix in self.buckets.values())
        self._order: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for shape in sorted(self.buckets):
            ix = self.buckets[shape]
            perm = [ix[j] for j in torch.randperm(len(ix), generator=g).tolist()]
            batches += [perm[k : k + self.batch_size] for k in range(0, len(perm), self.batch_size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def batch(self, micro_step: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        return self.collate([self.items[i] for i in self._order[1][position]], device, dtype)

    @staticmethod
    def collate(items: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        stack = lambda key: torch.stack([it[key] for it in items])  # noqa: E731
        return {"latent_mean": stack("latent_mean").to(device, torch.float32),  # (B, 16, h, w)
                "latent_std": stack("latent_std").to(device, torch.float32),
                "prompt_embeds": stack("prompt_embeds").to(device, dtype),  # (B, L, 4096)
                "pooled_prompt_embeds": stack("pooled_prompt_embeds").to(device, dtype),  # (B, 768)
                "text_ids": items[0]["text_ids"].to(device, dtype)}  # (L, 3): zeros for every caption
