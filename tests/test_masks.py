"""Masked loss (data.masked_loss): the loss math, the mask's crop/flip, caching and invalidation, and a tiny run
that trains with masks end to end."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxnb.base.errors import FluxnbError
from fluxnb.base.files import load_tensors, tensors_metadata
from fluxnb.config import ConfigError, DataConfig, RunConfig
from fluxnb.data import embeddings, latents, masks
from fluxnb.data.checks import Item, check_dataset
from fluxnb.data.sources import Record
from fluxnb.data.store import Sample, caption_id, sample_id
from fluxnb.run import open_run
from fluxnb.train.batches import TrainingData
from fluxnb.train.flow import flow_matching_loss, loss_weighting


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_an_all_ones_mask_gives_exactly_the_unmasked_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 6, 4, generator=g), torch.randn(3, 16, 6, 4, generator=g)
    w = loss_weighting("cosmap", torch.tensor([0.2, 0.5, 0.9]))
    ones = torch.ones(3, 1, 6, 4)
    assert torch.equal(flow_matching_loss(pred, target, w, ones), flow_matching_loss(pred, target, w))
    assert torch.equal(flow_matching_loss(pred, target, None, ones), flow_matching_loss(pred, target))


def test_a_black_region_takes_no_gradient_and_the_mean_stays_over_all_elements():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 16, 6, 4, generator=g).requires_grad_(), torch.randn(2, 16, 6, 4, generator=g)
    mask = torch.ones(2, 1, 6, 4)
    mask[:, :, :3] = 0.0  # top half ignored
    mask[1, :, 3:, :2] = 0.5  # a grey patch weighs a half
    loss = flow_matching_loss(pred, target, None, mask)
    loss.backward()
    assert (pred.grad[:, :, :3] == 0).all() and (pred.grad[:, :, 3:] != 0).all()
    changed = pred.detach().clone()
    changed[:, :, :3] += 100.0  # whatever the prediction is there, the loss does not move
    assert torch.equal(flow_matching_loss(changed, target, None, mask), loss.detach())
    expected = (mask * (pred.detach() - target) ** 2).sum() / pred.numel()  # sd-scripts: mean over all elements
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("flip", [False, True])
def test_the_cached_mask_gets_its_images_crop_and_flip(flip):
    # A grey-level picture that is its own mask: after the same transform, the mask must equal the image.
    rng = np.random.default_rng(0)
    grey = Image.fromarray((rng.random((12, 20)) * 255).astype(np.uint8), "L").resize((200, 120), Image.NEAREST)
    data = _png(grey.convert("RGB"))
    sid = sample_id(data, "c", flip=flip)
    item = Item(Sample(sid, "c", caption_id("c"), "x.png", 128, 64, flip), Record("x.png", "c", lambda: data,
                lambda: _png(grey)), crop="random")
    got = masks.latent_mask(item)  # (1, 8, 16)
    image = torch.from_numpy(np.asarray(item.image().convert("L"), dtype=np.float32) / 255)[None, None]
    want = torch.nn.functional.avg_pool2d(image, 8)[0]
    assert got.shape == (1, 8, 16)
    torch.testing.assert_close(got, want, atol=2 / 255, rtol=0)
    assert not torch.allclose(got, want.flip(-1), atol=0.05)  # the flip (or its absence) matters
    floored = masks.latent_mask(item, floor=0.2)
    torch.testing.assert_close(floored, 0.2 + 0.8 * got)
    no_mask = Item(item.sample, Record("x.png", "c", lambda: data))
    assert torch.equal(masks.latent_mask(no_mask), torch.ones(1, 8, 16))


def test_mask_floor_is_checked():
    with pytest.raises(ConfigError, match="mask_floor"):
        DataConfig(mask_floor=1.0)


def _masked_dataset(assets, dest: Path) -> Path:
    """The tiny dataset with a masks/ folder: a centre box for all images but the last two (they have none)."""
    shutil.copytree(assets.dataset, dest)
    names = sorted(p.name for p in dest.glob("*.png"))
    for name in names[:-2]:
        with Image.open(dest / name) as img:
            mask = Image.new("L", img.size, 0)
        mask.paste(255, (mask.width // 4, mask.height // 4, 3 * mask.width // 4, 3 * mask.height // 4))
        (dest / "masks").mkdir(exist_ok=True)
        mask.save(dest / "masks" / name)
    return dest


def _run(path: Path, assets, dataset: Path, **data):
    cfg = RunConfig(profile="tiny").replace(
        data={"dataset": str(dataset), "width": 64, "height": 96, "validation_prompts": list(assets.validation_prompts),
              "masked_loss": True, **data},
        model={"model_id": str(assets.model)}, train={"max_train_steps": 2, "sample_every": 0})
    cfg.save(path)
    return open_run(path, verbose=False)


def test_masks_are_cached_invalidated_and_trained_on(tiny_assets, tmp_path, capsys):
    dataset = _masked_dataset(tiny_assets, tmp_path / "data")
    run = _run(tmp_path / "run", tiny_assets, dataset, flip=True)
    embeddings.embed_step(run, progress=False)
    stats = latents.latents_step(run, progress=False)
    assert stats.total == stats.encoded == 32  # masks/ holds masks, not training images
    assert "2 image(s) have no mask" in capsys.readouterr().out
    prepared = check_dataset(run.config.data, progress=False)
    by_source = {i.record.source: i for i in prepared.items if not i.sample.flip}
    first = sorted(by_source)[0]
    cached = load_tensors(latents.latent_path(run.dir, by_source[first].sample.id))
    assert cached["mask"].shape == (1, 12, 8) and cached["mask"].min() == 0 and cached["mask"].max() == 1
    last = load_tensors(latents.latent_path(run.dir, by_source[sorted(by_source)[-1]].sample.id))
    assert torch.equal(last["mask"], torch.ones(1, 12, 8))  # no mask: trains unmasked

    # Edit one mask: that image (and its flipped copy) encodes again, nothing else.
    with Image.open(dataset / "masks" / first) as m:
        Image.new("L", m.size, 255).save(dataset / "masks" / first)
    prepared = check_dataset(run.config.data, progress=False)
    assert sorted(i.record.source for i in latents.pending(run, prepared)) == [first, first]
    assert latents.latents_step(run, progress=False).encoded == 2
    assert torch.equal(load_tensors(latents.latent_path(run.dir, by_source[first].sample.id))["mask"],
                       torch.ones(1, 12, 8))
    assert tensors_metadata(latents.latent_path(run.dir, by_source[first].sample.id))["mask"] != "none"

    batch = TrainingData(run.dir, 2, 0).batch(0, torch.device("cpu"), torch.float32)
    assert batch["loss_mask"].shape[:2] == (2, 1) and batch["loss_mask"].shape[2:] == batch["latent_mean"].shape[2:]
    from fluxnb.train import train

    result = train(run, live=False)  # the whole loop, with masks
    assert result.step == 2 and (run.dir.lora / "pytorch_lora_weights.safetensors").is_file()


def test_a_mask_of_another_size_is_one_clear_error_before_the_vae(tiny_assets, tmp_path):
    dataset = _masked_dataset(tiny_assets, tmp_path / "data")
    name = sorted(p.name for p in (dataset / "masks").iterdir())[0]
    Image.new("L", (10, 10), 255).save(dataset / "masks" / name)
    run = _run(tmp_path / "run", tiny_assets, dataset)
    prepared = check_dataset(run.config.data, progress=False)
    with pytest.raises(FluxnbError, match=rf"1 mask\(s\) cannot be used: {name} \(image \d+x\d+, mask 10x10\)"):
        latents.pending(run, prepared)


def test_off_by_default_nothing_changes(tiny_assets, tmp_path):
    cfg = RunConfig(profile="tiny")
    assert cfg.data.masked_loss is False
    assert set(latents.settings(cfg)) == {"model_id", "revision", "width", "height", "buckets", "bucket_step", "crop"}
    dataset = _masked_dataset(tiny_assets, tmp_path / "data")
    off = check_dataset(DataConfig(dataset=str(dataset), width=64, height=96), progress=False)
    assert all(i.record.mask is None for i in off.items)
    on = check_dataset(DataConfig(dataset=str(dataset), width=64, height=96, masked_loss=True), progress=False)
    assert len(on.items) == len(off.items) == 16 and sum(i.record.mask is not None for i in on.items) == 14


def test_hub_masks_come_from_the_mask_column(monkeypatch):
    import datasets

    img = Image.new("RGB", (64, 96), (200, 10, 10))
    mask = Image.new("L", (64, 96), 255)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [img, img.rotate(180)], "mask": [mask, None], "text": ["a", "b"]},
                                    features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: ds)
    cfg = DataConfig(dataset="user/masked", width=64, height=96, masked_loss=True)
    items = check_dataset(cfg, progress=False).items
    assert Image.open(io.BytesIO(items[0].record.mask())).size == (64, 96) and items[1].record.mask is None
    assert masks.unmasked(check_dataset(cfg, progress=False)) == ["row 1"]
    with pytest.raises(FluxnbError, match="has no image column 'alpha' for the masks"):
        check_dataset(DataConfig(dataset="user/masked", masked_loss=True, mask_column="alpha"), progress=False)


def test_cli_latents_turns_masks_on_with_a_floor(tiny_assets, tmp_path):
    from fluxnb.cli import main

    dataset = _masked_dataset(tiny_assets, tmp_path / "data")
    run = _run(tmp_path / "run", tiny_assets, dataset, masked_loss=False)
    embeddings.embed_step(run, progress=False)
    assert main(["latents", "--run-dir", str(run.dir.root), "--masked-loss", "--mask-floor", "0.25"]) == 0
    saved = open_run(run.dir.root, verbose=False).config.data
    assert saved.masked_loss and saved.mask_floor == 0.25
    weights = torch.cat([load_tensors(p)["mask"].flatten() for p in run.dir.latents.glob("*.safetensors")])
    assert weights.min() == 0.25 and weights.max() == 1.0


def test_a_mask_is_found_at_the_images_path_with_any_extension(tmp_path):
    from fluxnb.data.sources import find_mask

    (tmp_path / "masks" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "sub" / "v1.2.png").write_bytes(b"mask")
    (tmp_path / "masks" / "v1.png").write_bytes(b"not this one")
    cfg = DataConfig(dataset=str(tmp_path), masked_loss=True)
    assert find_mask(tmp_path, "sub/v1.2.jpg", cfg)() == b"mask"
    assert find_mask(tmp_path, "sub/other.jpg", cfg) is None
    assert find_mask(tmp_path, "sub/v1.2.jpg", DataConfig(dataset=str(tmp_path))) is None  # masks off


def test_a_cached_mask_with_nan_or_of_the_wrong_shape_makes_a_broken_latent():
    """A mask is read with its latent (load_sample): a NaN in it would reach the loss, so the file counts as broken
    and is encoded again (fluxnb.data.store.load_checked / cache_problem), as a NaN in the latent does."""
    good = {"mean": torch.zeros(16, 12, 8), "std": torch.ones(16, 12, 8), "mask": torch.ones(1, 12, 8)}
    assert latents.latent_problem(good) is None
    nan = good["mask"].clone()
    nan[0, 3, 4] = float("nan")
    assert latents.latent_problem(good | {"mask": nan}) == "NaN in cache"
    assert latents.latent_problem(good | {"mask": torch.ones(1, 12, 9)}) == "wrong mask"
    assert latents.latent_problem(good | {"mask": torch.ones(1, 12, 8, dtype=torch.float16)}) == "wrong mask"
