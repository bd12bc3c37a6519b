"""The tiny profile: a deterministic, offline FLUX.1-dev look-alike plus a small styled dataset."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxnb.tiny import flux as tiny
from fluxnb.tiny.dataset import BURGUNDY, PALETTE, TRIGGER_WORD, VALIDATION_PROMPTS, captions
from fluxnb.tiny.flux import TinyAssets, build_tiny, ensure_tiny

# Component classes of black-forest-labs/FLUX.1-dev's model_index.json.
FLUX_DEV_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipe(tiny_assets: TinyAssets):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_assets.model)


@pytest.fixture(scope="module")
def rows(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory):
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    return datasets.load_dataset("imagefolder", data_dir=str(tiny_assets.dataset), split="train",
                                 cache_dir=str(cache))


def test_build_is_offline_and_byte_identical(tiny_assets: TinyAssets, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("build_tiny tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    second = build_tiny(tmp_path / "again")
    first_files, second_files = _digests(tiny_assets.root), _digests(second.root)
    assert len(first_files) > 20
    assert first_files == second_files


def test_build_overwrites_stale_files(tmp_path: Path) -> None:
    junk = tmp_path / "model" / "junk.bin"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"old")
    build_tiny(tmp_path)
    assert not junk.exists()


def test_model_layout_matches_flux_dev(tiny_assets: TinyAssets) -> None:
    index = json.loads((tiny_assets.model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in index.items() if k in FLUX_DEV_COMPONENTS} == FLUX_DEV_COMPONENTS
    weights = list(tiny_assets.model.rglob("*.safetensors"))
    assert len(weights) == 4
    assert sum(p.stat().st_size for p in tiny_assets.model.rglob("*") if p.is_file()) < 20e6


def test_pipeline_loads_with_flux_dev_classes_and_generates(pipe, tiny_assets: TinyAssets) -> None:
    import torch
    import transformers

    for name, (library, class_name) in FLUX_DEV_COMPONENTS.items():
        module = __import__(library)
        # transformers 5 resolves T5TokenizerFast to T5Tokenizer, hence isinstance, not a name check.
        assert isinstance(getattr(pipe, name), getattr(module, class_name)), name
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert isinstance(pipe.tokenizer_2, transformers.T5TokenizerFast)

    image = pipe(VALIDATION_PROMPTS[0], height=96, width=64, num_inference_steps=2, guidance_scale=3.5,
                 max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (64, 96)


def test_tokenizers_behave_like_flux_dev(pipe) -> None:
    t5, clip = pipe.tokenizer_2, pipe.tokenizer
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert clip.model_max_length == 77
    for text in captions() + VALIDATION_PROMPTS:
        ids = t5(text).input_ids
        assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
        assert len(ids) - 1 == len(text.replace(",", " ,").split())  # known words are one token each
        assert clip(text).input_ids[0] == clip.bos_token_id
    # Unknown words fall back to characters rather than <unk>, like a real subword vocabulary.
    assert len(t5("Xylophone").input_ids) > 2 and t5.unk_token_id not in t5("Xylophone").input_ids

    prompt_embeds, pooled, text_ids = pipe.encode_prompt(VALIDATION_PROMPTS[1], prompt_2=None,
                                                         max_sequence_length=77)
    assert prompt_embeds.shape == (1, 77, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert text_ids.shape == (77, 3)


def test_imagefolder_loads_every_captioned_row(rows, tiny_assets: TinyAssets) -> None:
    assert len(rows) >= 12
    assert len(rows) == len(list(tiny_assets.dataset.glob("*.png")))
    assert set(rows.column_names) == {"image", "text"}
    captions = rows["text"]
    assert all(isinstance(c, str) and c.endswith(f"{TRIGGER_WORD} style") for c in captions)
    assert not set(captions) & set(tiny_assets.validation_prompts)
    sizes = [img.size for img in rows["image"]]
    assert len(set(sizes)) > 1
    assert max(set(sizes), key=sizes.count) == (64, 96)


def test_validation_prompts_are_stored_beside_the_data(tiny_assets: TinyAssets) -> None:
    stored = json.loads((tiny_assets.root / "validation_prompts.json").read_text())
    assert stored == tiny_assets.validation_prompts == VALIDATION_PROMPTS
    assert 3 <= len(stored) <= 4


def _near_palette(pixels: np.ndarray, tolerance: float = 40.0) -> np.ndarray:
    distances = np.linalg.norm(pixels[:, None, :] - np.asarray(PALETTE, float)[None], axis=-1)
    return distances.min(axis=1) <= tolerance


def test_images_share_one_style(tiny_assets: TinyAssets) -> None:
    images = sorted(tiny_assets.dataset.glob("*.png"))
    noise = np.random.default_rng(0).integers(0, 256, (96, 64, 3)).reshape(-1, 3).astype(float)
    assert _near_palette(noise).mean() < 0.3  # the check below would catch unstyled images
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"), float)
        assert _near_palette(rgb.reshape(-1, 3)).mean() > 0.95, path.name
        cream = np.all(rgb == PALETTE[0], axis=-1).mean()
        assert cream > 0.2, path.name  # the cream ground shows in every picture
        frame = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        assert np.all(frame == BURGUNDY), path.name  # and the burgundy frame surrounds it


def test_ensure_tiny_builds_once_and_rebuilds_outdated(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXNB_TINY_DIR", str(tmp_path / "cache"))
    assets = ensure_tiny()
    assert assets.root == (tmp_path / "cache").resolve()
    assert (assets.model / "model_index.json").is_file() and (assets.dataset / "metadata.jsonl").is_file()
    stamp = assets.root / tiny.STAMP_NAME
    first_mtime = (assets.model / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny() == assets
    assert (assets.model / "model_index.json").stat().st_mtime_ns == first_mtime  # reused, not rebuilt

    stamp.write_text(json.dumps({"seed": 0, "tiny_version": tiny.TINY_VERSION - 1}))
    assert ensure_tiny(tmp_path / "cache") == assets
    assert json.loads(stamp.read_text())["tiny_version"] == tiny.TINY_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary build dirs left behind

    keep = tmp_path / "cache" / "notes.txt"  # rebuilding must not wipe unrelated files in the root
    keep.write_text("mine")
    stamp.unlink()
    assert ensure_tiny(tmp_path / "cache") == assets
    assert keep.read_text() == "mine" and stamp.is_file()


def test_different_prompts_give_visibly_different_images(pipe) -> None:
    """Four validation prompts, one seed: each image differs from every other by a tenth of what another seed
    changes, or more (measured: a third; with default random weights it was 0.3-0.7% of the pixel range against
    a seed's 14%, so notebook 04's grid showed four copies of one image). Relative to the seed's change, so the
    check holds whatever scale of pixels a library version's initialisation gives the random model."""
    import torch

    pipe.set_progress_bar_config(disable=True)

    def image(prompt: str, seed: int = 0):
        return pipe(prompt, height=96, width=64, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=77,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    images = [image(p) for p in VALIDATION_PROMPTS]
    gaps = [np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1:]]
    seed_gap = np.abs(images[0] - image(VALIDATION_PROMPTS[0], seed=1)).mean()
    assert min(gaps) > 0.1 * seed_gap, ([round(float(g), 4) for g in gaps], round(float(seed_gap), 4))
