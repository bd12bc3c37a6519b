"""What training reads: the two caches joined per sample, held in memory, served in a replayable order.

    data = TrainingData(run.dir, batch_size=4, seed=0, accumulation=1, processes=1)
    for micro in data.micro_batches(step, rank, device, dtype):   # optimizer step s: a pure function of (seed, s)
        loss = micro.scale * training_step(..., micro.batch, ..., micro.generators, ...)
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass

import torch

from ..base.errors import FluxnbError
from ..data import embeddings, latents
from ..data.store import read_samples
from ..run import RunDir


class CachedDataset(torch.utils.data.Dataset):
    """The training set as cached by notebooks 01 and 02: one item per row of samples.jsonl.

    Each item joins a sample's latent with the embedding of its OWN caption through the ids in samples.jsonl,
    so the order in which a loader visits items cannot mix them up. Latents are the VAE's distribution
    (mean, std), unscaled; training draws a fresh sample from it every time (fluxnb.train.flow). Each file is
    checked as it is loaded (finite, the right tensors; fluxnb.data.store.load_checked), on the CPU and once per
    sample since TrainingData keeps what it loaded: a NaN in a cache names its file and the notebook that
    rebuilds it, rather than turning into a NaN loss blamed on the learning rate.
    """

    def __init__(self, run: RunDir | str, samples: list | None = None) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.samples = read_samples(self.run) if samples is None else samples  # samples.jsonl, maybe read already
        if not self.samples:
            raise FluxnbError(f"{self.run.samples_file} lists no samples: re-run notebook 01 on a non-empty dataset.")
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
        return {"id": sample.id, "caption": sample.caption, **latents.load_sample(self.run, sample.id),
                **embeddings.load_embedding(self.run, sample.caption)}  # + loss_mask with data.masked_loss


def sample_generator(seed: int, step: int, sample_id: str) -> torch.Generator:
    """The RNG of one sample at one optimizer step: its latent draw, noise and timestep depend on nothing else
    (not on the batch it shares, the micro-batch split or the number of GPUs), so any split gives the same run."""
    digest = hashlib.sha256(f"{seed}/{step}/{sample_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def caption_dropped(seed: int, step: int, sample_id: str, p: float) -> bool:
    """Whether caption dropout (probability p) swaps this sample's caption for the empty prompt at this step: a
    generator of its own, so its noise, timestep and latent draw (`sample_generator`) stay as they were."""
    return p > 0 and torch.rand((), generator=sample_generator(seed, step, f"{sample_id}/caption-dropout")).item() < p


@dataclass
class MicroBatch:
    """One forward/backward of one process: its samples (collated), their generators, and the loss scale.

    `scale` makes every sample of an optimizer step count equally whatever the split: accelerate divides each
    micro-batch's loss by the accumulation steps and DDP averages over processes, so a micro-batch of k samples
    out of a step of n gets scale = k * accumulation * processes / n (1 when the step is full). A process with
    no sample left in a short step still runs one (scale 0) so that every process joins the gradient all-reduce.
    """

    batch: dict[str, torch.Tensor]
    generators: list[torch.Generator]
    ids: list[str]
    scale: float


class TrainingData:
    """The cached training set, held in memory, served in a seeded order that a resumed run can replay.

    Optimizer step s of the run is a pure function of (seed, s): epoch e's order is a list of groups of up to
    `samples_per_step` samples, each group from one aspect-ratio bucket (the latents of a batch share a shape),
    permuted by a generator seeded by (seed, e). A group is split into processes x accumulation micro-batches
    of `batch_size`; process r takes its `accumulation` of them. Every sample is seen once per epoch.
    """

    def __init__(self, run: RunDir, batch_size: int, seed: int, *, accumulation: int = 1, processes: int = 1,
                 only: Collection[str] | None = None, samples: list | None = None,
                 caption_dropout: float = 0.0) -> None:
        dataset = CachedDataset(run, samples)
        # caption_dropout: the chance that a sample of a step trains on the empty prompt (fluxnb.data.embeddings)
        self.caption_dropout = caption_dropout
        self.empty = (embeddings.load_embedding(dataset.run, embeddings.EMPTY_PROMPT) | {"caption": ""}
                      if caption_dropout > 0 else None)
        # only: the sample ids to serve (fluxnb.train.validation keeps held-out images out); None = all
        self.items = [dataset[i] for i in range(len(dataset)) if only is None or dataset.samples[i].id in only]
        self.batch_size, self.seed, self.accumulation, self.processes = batch_size, seed, accumulation, processes
        self.samples_per_step = batch_size * accumulation * processes
        self.buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            self.buckets[tuple(item["latent_mean"].shape)].append(i)
        self.steps_per_epoch = sum(math.ceil(len(ix) / self.samples_per_step) for ix in self.buckets.values())
        self._order: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The groups (one per optimizer step) of epoch `epoch`, as item indices."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        groups, n = [], self.samples_per_step
        for shape in sorted(self.buckets):
            ix = self.buckets[shape]
            perm = [ix[j] for j in torch.randperm(len(ix), generator=g).tolist()]
            groups += [perm[k : k + n] for k in range(0, len(perm), n)]
        return [groups[j] for j in torch.randperm(len(groups), generator=g).tolist()]

    def group(self, step: int) -> list[int]:
        """The samples of optimizer step `step` (0-based), across all processes."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        return self._order[1][position]

    def micro_batches(self, step: int, rank: int, device: torch.device, dtype: torch.dtype) -> list[MicroBatch]:
        """Process `rank`'s `accumulation` micro-batches of optimizer step `step`."""
        group, bs = self.group(step), self.batch_size
        chunks = [group[c * bs : (c + 1) * bs] for c in range(self.processes * self.accumulation)]
        out = []
        for chunk in chunks[rank * self.accumulation : (rank + 1) * self.accumulation]:
            scale = len(chunk) * self.accumulation * self.processes / len(group)
            chunk = chunk or group[:1]  # nothing left for this process: one sample at scale 0
            items = [self.captioned(self.items[i], step) for i in chunk]
            ids = [item["id"] for item in items]
            out.append(MicroBatch(self.collate(items, device, dtype),
                                  [sample_generator(self.seed, step, sid) for sid in ids], ids, scale))
        return out

    def captioned(self, item: dict, step: int) -> dict:
        """`item`, or at caption dropout's draw the same image with the empty prompt's embedding."""
        if self.empty is None or not caption_dropped(self.seed, step, item["id"], self.caption_dropout):
            return item
        return item | self.empty

    def batch(self, k: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Micro-batch k of a one-process run, collated (for looking at the data, as notebook 03 does)."""
        step, part = divmod(k, self.accumulation)
        return self.micro_batches(step, 0, device, dtype)[part].batch

    @staticmethod
    def collate(items: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        stack = lambda key: torch.stack([it[key] for it in items])  # noqa: E731
        batch = {"latent_mean": stack("latent_mean").to(device, torch.float32),  # (B, 16, h, w)
                "latent_std": stack("latent_std").to(device, torch.float32),
                "prompt_embeds": stack("prompt_embeds").to(device, dtype),  # (B, L, 4096)
                "pooled_prompt_embeds": stack("pooled_prompt_embeds").to(device, dtype),  # (B, 768)
                "text_ids": items[0]["text_ids"].to(device, dtype)}  # (L, 3): zeros for every caption
        if "loss_mask" in items[0]:  # data.masked_loss: per-pixel loss weights (B, 1, h, w), fluxnb.data.masks
            batch["loss_mask"] = stack("loss_mask").to(device, torch.float32)
        if "control_latents" in items[0]:  # FLUX.1-Kontext-dev: each pair's input image, the VAE mean (B, 16, h, w);
            # fp32 like the target's, which the step scales before casting (fluxnb.train.step.with_control)
            batch["control_latents"] = stack("control_latents").to(device, torch.float32)
        return batch
