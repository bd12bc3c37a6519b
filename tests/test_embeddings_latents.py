"""Notebooks 01 + 02 on the tiny model: caches keyed by content, reuse, invalidation, and latent/caption pairing."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxnb.cli import main
from fluxnb.config import ModelConfig, RunConfig
from fluxnb.data import embeddings, latents
from fluxnb.data.buckets import fit_to_bucket, to_rgb
from fluxnb.data.store import CacheMismatch, read_samples, write_samples
from fluxnb.base.errors import FluxnbError
from fluxnb.base.files import load_tensors, save_tensors, tensors_metadata
from fluxnb.run.hardware import detect
from fluxnb.run import open_run
from fluxnb.train.batches import CachedDataset


def make_run(path: Path, assets, dataset: Path | None = None, **data):
    cfg = RunConfig(profile="tiny").replace(
        data={"dataset": str(dataset or assets.dataset), "width": 64, "height": 96,
              "validation_prompts": list(assets.validation_prompts), **data},
        model={"model_id": str(assets.model)})
    cfg.save(path)
    return open_run(path, verbose=False)


def copy_dataset(assets, dest: Path) -> Path:
    shutil.copytree(assets.dataset, dest)
    return dest


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cached_run(tiny_assets, tmp_path_factory):
    """The tiny dataset through both steps, with flipped copies and random crops."""
    run = make_run(tmp_path_factory.mktemp("run"), tiny_assets, flip=True, crop="random")
    embeddings.embed_step(run, progress=False)
    latents.latents_step(run, progress=False)
    return run


@pytest.fixture(scope="module")
def encoders(cached_run):
    pipe = embeddings.load_text_encoders(cached_run.config.model, cached_run.hw)
    vae = latents.load_vae(cached_run.config.model, cached_run.hw)
    return pipe, vae


def test_cached_files_shapes_and_metadata(cached_run):
    run = cached_run
    samples = read_samples(run.dir)
    assert len(samples) == 32 and sum(s.flip for s in samples) == 16
    texts = {s.caption for s in samples} | set(run.config.data.validation_prompts) | {""}  # "": caption dropout's
    assert len(list(run.dir.embeddings.glob("*.safetensors"))) == len(texts) == 21
    meta = json.loads((run.dir.embeddings / "meta.json").read_text())
    assert meta["model_id"] == run.config.model.model_id and meta["max_sequence_length"] == 77
    assert meta["dtype"] == "float32" and meta["t5_8bit"] is False
    lmeta = json.loads((run.dir.latents / "meta.json").read_text())
    assert (lmeta["width"], lmeta["height"], lmeta["buckets"], lmeta["crop"]) == (64, 96, True, "random")
    item = CachedDataset(run.dir)[0]
    assert item["prompt_embeds"].shape == (77, 32) and item["pooled_prompt_embeds"].shape == (32,)
    assert item["text_ids"].shape == (77, 3)
    s = samples[0]
    assert item["latent_mean"].shape == item["latent_std"].shape == (16, s.height // 8, s.width // 8)
    assert item["latent_mean"].dtype == torch.float32 and (item["latent_std"] > 0).all()


def _expected_latent(vae, run, sample) -> torch.Tensor:
    """Encode the sample's source file from scratch, independently of the cache's own Item."""
    img = to_rgb(Image.open(Path(run.config.data.dataset) / sample.source))
    img = fit_to_bucket(img, (sample.width, sample.height), "random", sample.id.removesuffix("-flip"), sample.flip)
    return latents.encode_image(vae, img)[0]


def test_each_latent_pairs_with_its_own_caption_under_shuffling(cached_run, encoders, tiny_assets):
    run, (pipe, vae) = cached_run, encoders
    truth = {row["file_name"]: row["text"] for row in map(json.loads, (tiny_assets.dataset / "metadata.jsonl").open())}
    samples = {s.id: s for s in read_samples(run.dir)}
    # Reorder samples.jsonl too: pairing must not depend on any order, the cache's or the loader's.
    write_samples(run.dir, list(reversed(samples.values())))
    loader = torch.utils.data.DataLoader(CachedDataset(run.dir), batch_size=1, shuffle=True,
                                         generator=torch.Generator().manual_seed(1), collate_fn=lambda b: b[0])
    seen = []
    for item in loader:
        s = samples[item["id"]]
        seen.append(item["id"])
        assert item["caption"] == truth[s.source]  # the caption written next to this very image file
        e, p, _ = embeddings.encode(pipe, [truth[s.source]], 77, run.hw.device)
        torch.testing.assert_close(item["prompt_embeds"], e[0])
        torch.testing.assert_close(item["pooled_prompt_embeds"], p[0])
        torch.testing.assert_close(item["latent_mean"], _expected_latent(vae, run, s), rtol=1e-4, atol=1e-4)
    assert sorted(seen) == sorted(samples) and seen != list(samples) and seen != list(reversed(samples))


def test_the_empty_prompt_is_cached_for_caption_dropout(cached_run, encoders):
    """Caption dropout (train.caption_dropout) swaps a caption's embedding for the empty prompt's: notebook 01 caches
    it with the captions, through the same encode call, so it can be switched on later without the encoders."""
    run, (pipe, _) = cached_run, encoders
    assert embeddings.is_current(run, embeddings.EMPTY_PROMPT)
    cached = embeddings.load_embedding(run.dir, "")
    e, p, _ = embeddings.encode(pipe, [""], 77, run.hw.device)
    torch.testing.assert_close(cached["prompt_embeds"], e[0])
    torch.testing.assert_close(cached["pooled_prompt_embeds"], p[0])


def test_rerun_reuses_everything(cached_run):
    before = digests(cached_run.dir.embeddings), digests(cached_run.dir.latents)
    assert embeddings.embed_step(cached_run, progress=False).encoded == 0
    assert latents.latents_step(cached_run, progress=False).encoded == 0
    assert (digests(cached_run.dir.embeddings), digests(cached_run.dir.latents)) == before


def test_a_changed_caption_recomputes_only_that_sample(tiny_assets, tmp_path):
    data = copy_dataset(tiny_assets, tmp_path / "data")
    run = make_run(tmp_path / "run", tiny_assets, data)
    embeddings.embed_step(run, progress=False)
    latents.latents_step(run, progress=False)
    meta = data / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[3]["text"] = "a brand new caption, tnyst style"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FluxnbError, match="Re-run notebook 01"):  # 02 before 01 after a caption edit
        latents.latents_step(run, progress=False)
    assert embeddings.embed_step(run, progress=False).encoded == 1
    assert latents.latents_step(run, progress=False).encoded == 1
    item = next(i for i in CachedDataset(run.dir) if i["caption"] == rows[3]["text"])
    assert item["id"] == next(s.id for s in read_samples(run.dir) if s.source == rows[3]["file_name"])


def test_other_settings_are_detected_never_silently_used(tiny_assets, tmp_path):
    run = make_run(tmp_path / "run", tiny_assets)
    embeddings.embed_step(run, progress=False)
    latents.latents_step(run, progress=False)
    kept = digests(run.dir.embeddings), digests(run.dir.latents)

    run.config = run.config.replace(data={"max_sequence_length": 32})
    with pytest.raises(CacheMismatch, match=r"max_sequence_length: cached 77, now 32"):
        embeddings.embed_step(run, progress=False)
    run.config = run.config.replace(data={"max_sequence_length": 77, "width": 96, "height": 64})
    with pytest.raises(CacheMismatch, match=r"width: cached 64, now 96"):
        latents.latents_step(run, progress=False)
    run.config = run.config.replace(model={"revision": "v2"})
    with pytest.raises(CacheMismatch, match="revision"):
        embeddings.embed_step(run, progress=False)
    assert (digests(run.dir.embeddings), digests(run.dir.latents)) == kept  # refusing lost nothing

    run.config = run.config.replace(model={"revision": None}, data={"max_sequence_length": 32})
    assert embeddings.embed_step(run, progress=False, overwrite=True).encoded == 21
    assert CachedDataset(run.dir)[0]["prompt_embeds"].shape == (32, 32)
    assert len(list(run.dir.embeddings.glob("*.safetensors"))) == 21  # the old ones were pruned
    assert latents.latents_step(run, progress=False, overwrite=True).encoded == 16
    assert {(s.width, s.height) for s in read_samples(run.dir)} == {(64, 64), (64, 96), (96, 64)}


def test_broken_or_interrupted_caches_resume(tiny_assets, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", tiny_assets)
    embeddings.embed_step(run, progress=False)
    real, calls = latents.encode_checked, []

    def crash_after_five(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # a Colab disconnect mid-way
        return real(*args)

    monkeypatch.setattr(latents, "encode_checked", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        latents.latents_step(run, progress=False)
    monkeypatch.setattr(latents, "encode_checked", real)
    assert latents.latents_step(run, progress=False).encoded == 11  # the 5 finished ones are kept
    victim = next(run.dir.latents.glob("*.safetensors"))
    victim.write_bytes(b"half a file")
    assert latents.latents_step(run, progress=False).encoded == 1


def spoil(path: Path, **tensors) -> None:
    """Rewrite a cached file with some tensors changed, its metadata (id, settings) kept: it looks reusable."""
    save_tensors(path, load_tensors(path) | tensors, metadata=tensors_metadata(path))


def test_broken_cached_files_are_encoded_again_and_named_never_reused(tiny_assets, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_assets)
    embeddings.embed_step(run, progress=False)
    latents.latents_step(run, progress=False)
    lat, emb = sorted(run.dir.latents.glob("*.safetensors")), sorted(run.dir.embeddings.glob("*.safetensors"))
    before = {p: load_tensors(p) for p in (*lat[:2], *emb[:2])}
    spoil(lat[0], mean=torch.full_like(before[lat[0]]["mean"], float("nan")))
    lat[1].write_bytes(lat[1].read_bytes()[:-64])  # cut short: the header still says it is this sample's latent
    spoil(emb[0], pooled_prompt_embeds=before[emb[0]]["pooled_prompt_embeds"] / 0)  # inf
    spoil(emb[1], prompt_embeds=before[emb[1]]["prompt_embeds"][:10])  # 10 tokens, not 77
    capsys.readouterr()
    stats = embeddings.embed_step(run, progress=False)
    assert stats.encoded == 2 and stats.broken == {"inf in cache": 1, "wrong shape": 1}
    assert f"0 encoded, 2 re-encoded (1 inf in cache, 1 wrong shape), {stats.total - 2} reused from the cache" in str(stats)
    stats = latents.latents_step(run, progress=False)
    assert stats.encoded == 2 and stats.broken == {"NaN in cache": 1, "unreadable": 1}
    out = capsys.readouterr().out
    for path in (*lat[:2], *emb[:2]):
        assert path.name in out  # named before they are encoded again
        for key, value in before[path].items():
            torch.testing.assert_close(load_tensors(path)[key], value)
    spoil(lat[0], std=before[lat[0]]["std"] * float("nan"))
    assert "(0 encoded, 1 re-encoded (NaN in cache), 15 reused from the cache)" in str(
        latents.latents_step(run, progress=False))
    assert latents.latents_step(run, progress=False).encoded == embeddings.embed_step(run, progress=False).encoded == 0


def test_a_broken_samples_or_meta_file_is_one_line_and_its_step_rebuilds_it(tiny_assets, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("FLUXNB_TINY_DIR", str(tiny_assets.root))
    root = tmp_path / "run"
    run_dir = ["--run-dir", str(root)]
    assert main(["embed", *run_dir, "--model", str(tiny_assets.model), "--dataset", str(tiny_assets.dataset),
                 "--width", "64", "--height", "96", "--profile", "tiny"]) == 0
    assert main(["latents", *run_dir]) == 0
    rows, meta = (root / "samples.jsonl").read_text(), (root / "embeddings" / "meta.json").read_text()
    (root / "samples.jsonl").write_text(rows[: len(rows) // 2])  # cut mid-line
    (root / "embeddings" / "meta.json").write_text(meta[:20])
    capsys.readouterr()
    assert main(["latents", *run_dir]) == 2  # it reads what notebook 01 wrote: it says to run that
    err = capsys.readouterr().err.strip()
    assert f"{root / 'embeddings' / 'meta.json'} is broken (not JSON)" in err and "Traceback" not in err, err
    assert f"python -m fluxnb embed --run-dir {root}" in err and len(err.splitlines()) == 1
    with pytest.raises(FluxnbError, match=r"samples.jsonl is broken \(line \d+: not JSON\).*fluxnb latents"):
        CachedDataset(root)
    assert main(["embed", *run_dir]) == 0  # the step that writes them rebuilds both
    assert re.search(r"0 encoded, \d+ reused from the cache; rebuilt samples.jsonl \(line", capsys.readouterr().out)
    assert (root / "samples.jsonl").read_text() == rows and json.loads((root / "embeddings" / "meta.json").read_text())
    (root / "latents" / "meta.json").write_text("[1, 2]")
    assert main(["latents", *run_dir]) == 0
    assert "16 reused from the cache; rebuilt meta.json (wrong fields)" in capsys.readouterr().out
    assert len(CachedDataset(root)) == 16


def test_latents_need_embeddings_first(tiny_assets, tmp_path):
    run = make_run(tmp_path / "run", tiny_assets)
    with pytest.raises(FluxnbError, match="notebook 01"):
        latents.latents_step(run, progress=False)
    assert not run.dir.latents.exists() or not any(run.dir.latents.glob("*.safetensors"))


def test_cli_embed_then_latents(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUXNB_TINY_DIR", str(tiny_assets.root))  # reuse the session's build
    run_dir = tmp_path / "run"
    assert main(["embed", "--run-dir", str(run_dir), "--model", str(tiny_assets.model), "--dataset",
                 str(tiny_assets.dataset), "--width", "64", "--height", "96", "--profile", "tiny"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["model_id"] == str(tiny_assets.model) and saved["data"]["dataset"] == str(tiny_assets.dataset)
    assert main(["latents", "--run-dir", str(run_dir), "--flip"]) == 0  # model and dataset from config.json
    assert len(CachedDataset(run_dir)) == 32
    out = capsys.readouterr().out
    assert "embeddings: 21 texts (21 encoded" in out and "latents: 32 samples (32 encoded" in out
    assert main(["latents", "--run-dir", str(run_dir), "--width", "96", "--height", "64"]) == 2  # other size
    assert "latents was made with other settings (width: cached 64, now 96" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["data"]["width"] == 64  # a refused step saves nothing


def test_cli_bad_input_is_one_line_without_traceback(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUXNB_TINY_DIR", str(tiny_assets.root))
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    assert main(["embed", "--run-dir", str(tmp_path / "run"), "--dataset", str(bad), "--profile", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "error: Dataset:" in err and "a.png: not an image" in err and "Traceback" not in err


def test_gated_model_says_how_to_log_in(monkeypatch):
    from diffusers import FluxPipeline
    from hub_fakes import gated_load

    monkeypatch.setattr(FluxPipeline, "from_pretrained", gated_load)
    with pytest.raises(FluxnbError) as err:
        embeddings.load_text_encoders(ModelConfig(), detect("tiny"))
    msg = str(err.value)
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in msg
    assert "notebook_login()" in msg and "hf auth login" in msg and "licence" in msg


def test_real_model_offline_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FluxnbError, match="not in the local Hugging Face cache"):
        latents.load_vae(ModelConfig(), detect("tiny"))


def test_cuda_loads_t5_in_8bit(monkeypatch):
    """The CUDA branch (run for real by benchmarks/gpu_check_data.py): T5 through BitsAndBytesConfig int8."""
    from transformers import T5EncoderModel

    seen = {}
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", lambda *a, **kw: seen.update(args=a, kw=kw) or "t5")
    hw = detect("tiny")
    cuda_hw = type(hw)("real", torch.device("cuda"), torch.bfloat16, None, "test")
    assert embeddings._load_t5_8bit(ModelConfig(), cuda_hw) == "t5"
    assert seen["kw"]["quantization_config"].load_in_8bit and seen["kw"]["subfolder"] == "text_encoder_2"
    assert seen["kw"]["device_map"] == {"": 0} and seen["kw"]["dtype"] == torch.bfloat16


def test_cpu_keeps_t5_in_plain_dtype(encoders):
    pipe, vae = encoders
    assert set(embeddings.t5_linear_layers(pipe)) == {"Linear"}
    assert pipe.text_encoder_2.dtype == torch.float32 and vae.dtype == torch.float32
