"""Notebook 01's computation: encode every caption once with CLIP + T5, cache it, free the encoders.

FLUX.1-dev reads text through two encoders: CLIP-L gives one pooled vector per prompt (768,), T5-XXL gives one
vector per token (max_sequence_length, 4096). T5-XXL alone is 4.7 B parameters (9.5 GB in bf16). Captions never
change during training, so we run the encoders once per caption, save the outputs
(embeddings/<caption_id>.safetensors), and training never loads them: that is most of the blog's memory win.

On CUDA T5 is loaded in 8-bit (bitsandbytes LLM.int8): its attention and first MLP matrices, 3.6 B of its 4.7 B
parameters, as int8; transformers keeps the `wo` matrices in bf16 (fp32 under fp16): ~6 GB instead of 9.5 GB on a
bf16 GPU, ~8 GB on a T4. On the CPU it stays in the run's plain dtype. The encoding itself is diffusers' own
`FluxPipeline.encode_prompt` on a pipeline loaded without transformer and VAE.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..base.errors import FluxnbError
from ..base.files import save_tensors
from ..base.hub_errors import friendly_load
from ..base.memory import free, measure, report
from ..config import ModelConfig, RunConfig
from ..run import Run, RunDir, writes
from ..run.hardware import Hardware
from .checks import CheckedDataset, check_dataset, progress_bar, quiet_length_warning
from .store import (
    CacheStats,
    Sample,
    cache_problem,
    caption_id,
    check_meta,
    fingerprint,
    is_cached,
    load_checked,
    name_broken,
    non_finite,
    own_file_problems,
    prune,
    read_samples,
    remove_abandoned,
    rerun,
    write_meta,
    write_samples,
)


EMPTY_PROMPT = ""  # FLUX has no unconditional training otherwise: caption dropout swaps a caption for this


def settings(config: RunConfig) -> dict[str, Any]:
    """What makes a cached embedding valid: another model or sequence length gives other vectors."""
    m = config.model
    return {"model_id": m.model_id, "revision": m.revision, "max_sequence_length": config.data.max_sequence_length}


def embedding_path(run: RunDir, text: str) -> Path:
    """embeddings/<caption_id>.safetensors: T5 prompt_embeds (L, 4096), CLIP pooled (768,), text_ids (L, 3)."""
    return run.embeddings / f"{caption_id(text)}.safetensors"


def save_embedding(run: RunDir, text: str, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                   text_ids: torch.Tensor, settings_hash: str) -> None:
    save_tensors(embedding_path(run, text),
                 {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids},
                 metadata={"id": caption_id(text), "settings": settings_hash, "text": text[:1000]})


def embedding_problem(tensors: dict[str, torch.Tensor], length: int | None = None) -> str | None:
    """Why cached tensors are not an embedding to train on (None: they are): the three tensors, floating point,
    (L, D_t5), (D_clip,), (L, 3) with L = `length` when given, finite."""
    e, p, ids = (tensors.get(k) for k in ("prompt_embeds", "pooled_prompt_embeds", "text_ids"))
    if e is None or p is None or ids is None or not all(t.is_floating_point() for t in (e, p, ids)):
        return "wrong tensors"
    if e.ndim != 2 or p.ndim != 1 or ids.shape != (e.shape[0], 3) or length not in (None, e.shape[0]):
        return "wrong shape"
    return non_finite(e, p, ids)


def load_embedding(run: RunDir, text: str) -> dict[str, torch.Tensor]:
    """{"prompt_embeds": (L, D_t5), "pooled_prompt_embeds": (D_clip,), "text_ids": (L, 3)} of one cached text,
    checked (BrokenCacheFile when NaN or unreadable)."""
    path = embedding_path(run, text)
    if not path.is_file():
        raise FluxnbError(f"no cached embedding for {text[:60]!r}: re-run notebook 01 (`python -m fluxnb embed`), "
                          "which encodes the captions and the validation prompts.")
    return load_checked(path, embedding_problem, rerun(run.root, "embeddings"))


def load_prompts(run: RunDir, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached embeddings of several texts, stacked: prompt_embeds (P, L, D_t5), pooled (P, D_clip)."""
    loaded = [load_embedding(run, t) for t in texts]
    return (torch.stack([e["prompt_embeds"] for e in loaded]), torch.stack([e["pooled_prompt_embeds"] for e in loaded]))


def problems(run: Run, texts: list[str], *, overwrite: bool = False, contents: bool = True) -> dict[str, str]:
    """The texts without a usable cached embedding, and why (fluxnb.data.store.cache_problem: missing, other
    settings, or broken: NaN, unreadable, ...; contents=False: by the files' headers alone). Raises CacheMismatch
    if embeddings/ was made otherwise."""
    wanted = settings(run.config)
    if not overwrite:
        check_meta(run.dir.embeddings, wanted, rebuild=True)
    tag, length = fingerprint(wanted), run.config.data.max_sequence_length
    check = functools.partial(embedding_problem, length=length) if contents else None
    found = {t: cache_problem(embedding_path(run.dir, t), tag, caption_id(t), check) for t in dict.fromkeys(texts)}
    return {t: why for t, why in found.items() if why}


def missing(run: Run, texts: list[str], *, overwrite: bool = False) -> list[str]:
    """The texts without a usable cached embedding (see `problems`)."""
    return list(problems(run, texts, overwrite=overwrite))


def stale(run: Run, samples: list[Sample] | None = None) -> list[str]:
    """The captions of samples.jsonl (or `samples`, read from it already) whose embedding is missing or was made
    with other settings than the config's."""
    tag = fingerprint(settings(run.config))
    captions = dict.fromkeys(s.caption for s in (read_samples(run.dir) if samples is None else samples))
    return [c for c in captions if not is_cached(embedding_path(run.dir, c), tag, caption_id(c))]


def load_tokenizer(model: ModelConfig) -> Any:
    """T5's tokenizer alone (a few MB), to count caption tokens before the 9.5 GB encoder is loaded."""
    from transformers import AutoTokenizer

    return friendly_load(lambda: AutoTokenizer.from_pretrained(
        model.model_id, subfolder="tokenizer_2", revision=model.revision), model.model_id)


def _load_t5_8bit(model: ModelConfig, hw: Hardware) -> Any:
    from transformers import BitsAndBytesConfig, T5EncoderModel

    # transformers keeps T5's `wo` (second MLP) matrices out of int8 (and in fp32 under fp16) for stability.
    return T5EncoderModel.from_pretrained(
        model.model_id, subfolder="text_encoder_2", revision=model.revision, dtype=hw.dtype,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": hw.device.index or 0})


def load_text_encoders(model: ModelConfig, hw: Hardware) -> Any:
    """A FluxPipeline holding only CLIP + T5 (+ tokenizers): transformer=None, vae=None are never downloaded."""
    from diffusers import FluxPipeline

    def load() -> Any:
        t5 = _load_t5_8bit(model, hw) if hw.device.type == "cuda" else None
        extra = {"text_encoder_2": t5} if t5 is not None else {}
        pipe = FluxPipeline.from_pretrained(model.model_id, revision=model.revision, transformer=None, vae=None,
                                            dtype=hw.dtype, **extra)
        pipe.text_encoder.to(hw.device)
        if t5 is None:
            pipe.text_encoder_2.to(hw.device)
        return pipe

    return friendly_load(load, model.model_id)


def t5_linear_layers(pipe: Any) -> Counter:
    """How T5's Linear layers are held, e.g. Counter({'Linear8bitLt': 144, 'Linear': 24}) on CUDA."""
    return Counter(type(m).__name__ for m in pipe.text_encoder_2.modules() if isinstance(m, torch.nn.Linear))


def texts_to_encode(config: RunConfig, prepared: CheckedDataset) -> list[str]:
    """The dataset's captions, the validation prompts (sampled during training without any text encoder), and the
    empty prompt (train.caption_dropout trains on it; cached always, so it can be switched on in notebook 03)."""
    return list(dict.fromkeys([*prepared.captions, *config.data.validation_prompts, EMPTY_PROMPT]))


def is_current(run: Run, text: str) -> bool:
    """Whether `text` has a cached embedding made with the run's settings."""
    return is_cached(embedding_path(run.dir, text), fingerprint(settings(run.config)), caption_id(text))


def pending(run: Run, prepared: CheckedDataset, *, overwrite: bool = False) -> list[str]:
    """Captions and validation prompts without a valid cached embedding (see `missing`)."""
    return missing(run, texts_to_encode(run.config, prepared), overwrite=overwrite)


class _NoTruncationEcho(logging.Filter):
    """diffusers logs the cut-off part of every too-long caption, in full, batch after batch (megabytes for long
    captions); the data report already names the long captions, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The following part of your input was truncated")


@torch.no_grad()
def encode(pipe: Any, texts: list[str], max_sequence_length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Texts -> prompt_embeds (B, L, D_t5), pooled_prompt_embeds (B, D_clip), text_ids (L, 3), through diffusers'
    FluxPipeline.encode_prompt; refuses NaN/inf."""
    from diffusers.pipelines.flux import pipeline_flux

    echo = _NoTruncationEcho()
    pipeline_flux.logger.addFilter(echo)
    try:
        with warnings.catch_warnings(), quiet_length_warning(pipe.tokenizer, pipe.tokenizer_2):
            # bitsandbytes warns on every int8 matmul of a bf16 input; once is plenty
            warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=texts, prompt_2=None, device=device, max_sequence_length=max_sequence_length)
    finally:
        pipeline_flux.logger.removeFilter(echo)
    bad = [t for t, e, p in zip(texts, prompt_embeds, pooled) if not (e.isfinite().all() and p.isfinite().all())]
    if bad:
        raise FluxnbError(f"the text encoders returned NaN/inf for {len(bad)} caption(s) (first: {bad[0][:60]!r}). "
                          "This is a precision overflow: set the run's dtype to 'bf16' or 'fp32' and run again.")
    return prompt_embeds, pooled, text_ids


def encode_and_save(run: Run, pipe: Any, texts: list[str], *, batch_size: int = 8, progress: bool = True) -> None:
    """Encode `texts` with the pipeline's CLIP + T5 and write one embedding file each (meta.json first: a crash
    midway leaves files that the meta describes)."""
    wanted = settings(run.config)
    t5 = pipe.text_encoder_2
    write_meta(run.dir.embeddings, wanted | {"dtype": str(t5.dtype).removeprefix("torch."),
                                             "t5_8bit": bool(getattr(t5, "is_loaded_in_8bit", False))})
    tag = fingerprint(wanted)
    length = run.config.data.max_sequence_length
    with progress_bar(total=len(texts), show=progress and bool(texts), desc="encoding captions", unit="caption") as bar:
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            prompt_embeds, pooled, text_ids = encode(pipe, batch, length, run.hw.device)
            for text, e, p in zip(batch, prompt_embeds, pooled):  # (L, D_t5), (D_clip,)
                save_embedding(run.dir, text, e, p, text_ids, tag)
            bar.update(len(batch))


@writes("embed")
def cache_embeddings(run: Run, pipe: Any, prepared: CheckedDataset, *, overwrite: bool = False, batch_size: int = 8,
                     progress: bool = True) -> CacheStats:
    """Encode what is not cached yet, save one file per text, then write samples.jsonl (the training set)."""
    start = time.perf_counter()
    rebuilt = own_file_problems(run.dir, run.dir.embeddings)  # samples.jsonl, meta.json: written anew below
    found = problems(run, texts_to_encode(run.config, prepared), overwrite=overwrite)
    todo, wanted = list(found), settings(run.config)
    if todo and pipe is None:
        raise FluxnbError(f"{len(todo)} caption(s) need encoding but no text encoders were given: "
                          "load them with load_text_encoders first.")
    remove_abandoned(run.dir, run.dir.embeddings)
    broken = name_broken(run.dir.embeddings, {embedding_path(run.dir, t): why for t, why in found.items()})
    if todo or (overwrite and pipe is not None):
        encode_and_save(run, pipe, todo, batch_size=batch_size, progress=progress)
    elif overwrite or not check_meta(run.dir.embeddings, wanted, rebuild=True):
        write_meta(run.dir.embeddings, wanted)
    if overwrite:
        prune(run.dir.embeddings, fingerprint(wanted))
    write_samples(run.dir, prepared.samples)
    n = len(texts_to_encode(run.config, prepared))
    return CacheStats("embeddings", "texts", n, len(todo), time.perf_counter() - start, broken, rebuilt)


def embed_step(run: Run, *, overwrite: bool = False, progress: bool = True) -> CacheStats:
    """The whole of notebook 01 headless (`python -m fluxnb embed`): check, encode what is missing, free."""
    prepared = check_dataset(run.config.data, load_tokenizer(run.config.model), progress=progress,
                             kontext=run.config.model.kontext)
    print(prepared.report)
    if not pending(run, prepared, overwrite=overwrite):
        return cache_embeddings(run, None, prepared, overwrite=overwrite, progress=progress)
    with measure("text encoders: load + encode") as m:
        pipe = load_text_encoders(run.config.model, run.hw)
        print(f"T5 Linear layers: {dict(t5_linear_layers(pipe))}")
        stats = cache_embeddings(run, pipe, prepared, overwrite=overwrite, progress=progress)
    print(m)
    free(pipe)
    print(report("after freeing the text encoders"))
    return stats
