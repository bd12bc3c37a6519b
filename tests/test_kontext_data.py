"""FLUX.1-Kontext-dev's data side: pairs found (local folder, Hub), checked before the VAE, the control fitted like
its target and cached as its VAE mean, invalidated when edited, read back for training; config, captions and the
tiny profile's paired dataset."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fluxnb.base.errors import FluxnbError
from fluxnb.base.files import load_tensors, save_tensors, tensors_metadata
from fluxnb.config import BASES, ConfigError, DataConfig, ModelConfig, RunConfig
from fluxnb.data import controls, embeddings, latents
from fluxnb.data.buckets import crop_centering
from fluxnb.data.captions import plan_captions
from fluxnb.data.checks import DataError, Item, check_dataset
from fluxnb.data.sources import Record, load_records
from fluxnb.data.store import BrokenCacheFile, Sample, caption_id, sample_id
from fluxnb.run import open_run
from fluxnb.run.open import tiny_data_for_base
from fluxnb.tiny.pairs import VALIDATION_PROMPTS, ensure_tiny_pairs

KONTEXT = "FLUX.1-Kontext-dev"


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs():
    return ensure_tiny_pairs()


def _run(path: Path, assets, dataset: Path, **data):
    cfg = RunConfig(profile="tiny").replace(
        data={"dataset": str(dataset), "width": 64, "height": 96, "validation_prompts": list(VALIDATION_PROMPTS),
              **data},
        model={"model_id": str(assets.model), "base": KONTEXT}, train={"max_train_steps": 2, "sample_every": 0})
    cfg.save(path)
    return open_run(path, verbose=False)


@pytest.fixture(scope="module")
def cached(tiny_assets, pairs, tmp_path_factory):
    """The tiny pairs through notebooks 01 and 02, with flipped copies and random crops."""
    dataset = tmp_path_factory.mktemp("pairs") / "data"
    shutil.copytree(pairs.dataset, dataset)
    run = _run(tmp_path_factory.mktemp("run"), tiny_assets, dataset, flip=True, crop="random")
    embeddings.embed_step(run, progress=False)
    latents.latents_step(run, progress=False)
    return run


def test_sources_find_controls_beside_local_images(tmp_path):
    red, blue = Image.new("RGB", (32, 48), "red"), Image.new("RGB", (32, 48), "blue")
    (tmp_path / "sub").mkdir()
    (tmp_path / "control" / "sub").mkdir(parents=True)
    (tmp_path / "a.png").write_bytes(_png(red))
    (tmp_path / "sub" / "b.v2.jpg").write_bytes(_png(red, "JPEG"))
    (tmp_path / "control" / "a.webp").write_bytes(_png(blue, "WEBP"))  # any image extension
    (tmp_path / "control" / "sub" / "b.v2.png").write_bytes(b"control of b")
    for name in ("a", "sub/b.v2"):
        (tmp_path / f"{name}.txt").write_text("make it blue")
    cfg = DataConfig(dataset=str(tmp_path))
    found = {r.source: r for r in load_records(cfg, kontext=True).records}
    assert sorted(found) == ["a.png", "sub/b.v2.jpg"]  # control/ holds inputs, not training images
    assert Image.open(io.BytesIO(found["a.png"].control())).getpixel((0, 0))[2] > 200
    assert found["sub/b.v2.jpg"].control() == b"control of b"
    plain = load_records(cfg).records  # not Kontext: nothing changes, control/ is images like any folder
    assert all(r.control is None for r in plain) and "control/a.webp" in {r.source for r in plain}
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "make it blue"}) + "\n")
    listed = load_records(cfg, kontext=True)  # the imagefolder layout: same rule
    assert [r.source for r in listed.records] == ["a.png"] and listed.records[0].control is not None
    assert "1 image(s) in the folder are not in metadata.jsonl" in listed.notes[0]  # sub/b.v2.jpg, not the controls


def test_hub_controls_come_from_the_control_column(monkeypatch):
    import datasets

    img, ctl = Image.new("RGB", (64, 96), (200, 10, 10)), Image.new("RGB", (64, 96), (10, 10, 200))
    features = datasets.Features({"image": datasets.Image(), "control_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [img, img.rotate(180)], "control_image": [ctl, None],
                                     "text": ["make it red", "make it red too"]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: ds)
    cfg = DataConfig(dataset="user/pairs", width=64, height=96)
    records = load_records(cfg, kontext=True).records
    assert Image.open(io.BytesIO(records[0].control())).getpixel((0, 0)) == (10, 10, 200)
    assert records[1].control is None
    with pytest.raises(DataError, match=r"1 pair\(s\) have no usable control image: row 1 \(no control\)"):
        check_dataset(cfg, progress=False, kontext=True)  # notebook 01 already, before T5
    assert all(i.record.control is None for i in check_dataset(cfg, progress=False).items)  # not Kontext
    with pytest.raises(FluxnbError, match="has no image column 'input' for the pairs' control"):
        check_dataset(DataConfig(dataset="user/pairs", control_column="input"), progress=False, kontext=True)


def test_a_missing_control_stops_notebook_01_and_a_broken_one_notebook_02(tiny_assets, pairs, tmp_path,
                                                                           monkeypatch):
    dataset = tmp_path / "data"
    shutil.copytree(pairs.dataset, dataset)
    moved = (dataset / "control" / "01_mountain.png").read_bytes()
    (dataset / "control" / "01_mountain.png").unlink()
    (dataset / "control" / "02_flower.png").write_bytes(b"not a png")
    run = _run(tmp_path / "run", tiny_assets, dataset)

    def no_model(*args, **kwargs):
        raise AssertionError("no model may load before the controls are checked")

    monkeypatch.setattr(embeddings, "load_text_encoders", no_model)
    monkeypatch.setattr(latents, "load_vae", no_model)
    with pytest.raises(DataError, match=r"ERROR: 1 pair\(s\) have no usable control image: 01_mountain.png \(no "
                                        r"control\)\. .*control/<the image's path>.*; or remove those images\.$"):
        embeddings.embed_step(run, progress=False)  # the missing one: in notebook 01's check, before T5
    (dataset / "control" / "01_mountain.png").write_bytes(moved)
    monkeypatch.undo()
    embeddings.embed_step(run, progress=False)
    monkeypatch.setattr(latents, "load_vae", no_model)
    with pytest.raises(FluxnbError) as err:
        latents.latents_step(run, progress=False)  # the undecodable one: notebook 02, before the VAE
    message = str(err.value)
    assert message.startswith("1 pair(s) have no usable control image: 02_flower.png (control unreadable: "
                              "UnidentifiedImageError).")
    assert "\n" not in message and "control/<the image's path>" in message
    assert not list(run.dir.latents.glob("*.safetensors"))  # nothing encoded, nothing written
    prepared = check_dataset(run.config.data, progress=False)  # checked without kontext: said so, not "missing"
    with pytest.raises(FluxnbError, match="checked without its control images"):
        latents.pending(run, prepared)


def _pair_folder(folder: Path, controls_of: dict[str, bytes | None]) -> Path:
    """One red target per name, captioned "make it blue", with the given control bytes (None: no control)."""
    (folder / "control").mkdir(parents=True)
    for name, control in controls_of.items():
        (folder / f"{name}.png").write_bytes(_png(Image.new("RGB", (64, 96), "red")))
        (folder / f"{name}.txt").write_text("make it blue")
        if control is not None:
            (folder / "control" / f"{name}.png").write_bytes(control)
    return folder


def test_a_pairs_id_covers_its_control_and_other_ids_stay_as_they_were(tmp_path):
    from types import SimpleNamespace

    from fluxnb.train.guard import data_fingerprint
    from fluxnb.train.validation import holdout

    assert sample_id(b"image bytes", "a red cat") == "8f4be97b5442b0fa"  # as before: existing caches stay valid
    assert sample_id(b"image bytes", "a red cat", flip=True) == "8f4be97b5442b0fa-flip"
    blue, green = _png(Image.new("RGB", (64, 96), "blue")), _png(Image.new("RGB", (64, 96), "green"))
    folder = _pair_folder(tmp_path / "data", {"a": blue, "b": green})  # same target, same instruction
    cfg = DataConfig(dataset=str(folder), width=64, height=96, flip=True)
    prepared = check_dataset(cfg, progress=False, kontext=True)
    assert prepared.report.samples == 2 and len(prepared.items) == 4  # two pairs, not one and a "duplicate"
    ids = {(i.sample.source, i.sample.flip): i.sample.id for i in prepared.items}
    assert ids[("a.png", True)] == ids[("a.png", False)] + "-flip"  # a flip still groups with its original
    assert sorted(map(len, holdout(list(ids.values()), 1, seed=0))) == [2, 2]
    assert ids[("a.png", False)] == sample_id((folder / "a.png").read_bytes(), "make it blue", control=blue)
    assert prepared.items[0].image().size == (64, 96)  # Item.image's id check agrees with check_dataset's
    run = SimpleNamespace(config=RunConfig().replace(model={"base": KONTEXT}))
    before = data_fingerprint(run, prepared.samples)
    (folder / "control" / "b.png").write_bytes(_png(Image.new("RGB", (64, 96), "white")))  # a control edited
    with pytest.raises(FluxnbError, match="b.png changed on disk since the dataset was checked"):
        next(i for i in prepared.items if i.sample.source == "b.png").image()
    after = check_dataset(cfg, progress=False, kontext=True)
    assert data_fingerprint(run, after.samples) != before  # so --resume notices the data changed


def test_check_dataset_names_pairs_without_a_control(tmp_path):
    blue = _png(Image.new("RGB", (64, 96), "blue"))
    folder = _pair_folder(tmp_path / "some", {"a": blue, "b": None, "c": blue})
    (folder / "c.txt").unlink()  # a row's other problems are reported with it
    with pytest.raises(DataError) as err:
        check_dataset(DataConfig(dataset=str(folder), width=64, height=96), progress=False, kontext=True)
    report = str(err.value)
    assert "ERROR: 1 pair(s) have no usable control image: b.png (no control). FLUX.1-Kontext-dev learns to edit a " \
           "control image into its target: put each pair's input image at control/<the image's path>" in report
    assert "c.png (missing)" in report and "paired dataset" not in report
    plain = _pair_folder(tmp_path / "plain", {"a": None, "b": None})  # a text-to-image folder: no control at all
    with pytest.raises(DataError, match=r"2 pair\(s\) have no usable control image: a.png \(no control\), b.png "
                                        r"\(no control\)\..*; or remove those images, or choose a paired dataset: "
                                        r"FLUX.1-Kontext-dev trains on \(input image, instruction\) -> result pairs "
                                        r"\(README, 'FLUX.1-Kontext-dev: image editing pairs'\)\.$"):
        check_dataset(DataConfig(dataset=str(plain), width=64, height=96), progress=False, kontext=True)


def test_a_hub_dataset_without_controls_is_told_to_choose_a_paired_one(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 96))], "text": ["a cat"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: ds)
    with pytest.raises(FluxnbError, match=r"has no image column 'control_image' for the pairs' control \(input\) "
                                          r"images \(columns: image, text\): set control_column to the column holding "
                                          r"each pair's input image, or choose a paired dataset: FLUX.1-Kontext-dev "
                                          r"trains on \(input image, instruction\) -> result pairs \(README, "
                                          r"'FLUX.1-Kontext-dev: image editing pairs'\)\.$"):
        load_records(DataConfig(dataset="user/text-to-image"), kontext=True)


def _vae_mean(vae, img: Image.Image) -> torch.Tensor:
    """diffusers' own pixels -> posterior mean, (16, H/8, W/8). (The pixels' memory layout matters to ~5e-5 in fp32
    on CPU: VaeImageProcessor's is the one FluxKontextPipeline feeds its VAE.)"""
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        return vae.encode(VaeImageProcessor(vae_scale_factor=8).preprocess(img)).latent_dist.mean[0]


def test_the_cached_control_is_the_vae_mean_of_the_control_fitted_like_its_target(cached, pairs):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(cached.config.model.model_id, subfolder="vae").eval()
    prepared = check_dataset(cached.config.data, progress=False, kontext=True)
    assert len(prepared.items) == 16
    by_flip = {}
    for item in prepared.items:
        s = item.sample
        tensors = load_tensors(latents.latent_path(cached.dir, s.id))
        assert tensors["control"].dtype == torch.float32
        assert tensors["control"].shape == tensors["mean"].shape == (16, s.height // 8, s.width // 8)
        with Image.open(pairs.dataset / "control" / s.source) as img:  # by hand: cover the bucket, crop, mirror
            fitted = ImageOps.fit(img.convert("RGB"), (s.width, s.height), Image.Resampling.LANCZOS,
                                  centering=crop_centering("random", s.id.removesuffix("-flip")))
        fitted = ImageOps.mirror(fitted) if s.flip else fitted
        torch.testing.assert_close(tensors["control"], _vae_mean(vae, fitted), atol=1e-5, rtol=1e-5)
        by_flip[(s.source, s.flip)] = tensors["control"]
    big = Image.open(pairs.dataset / "control" / "03_waves.png").size
    assert big == (128, 192)  # a control twice its target's size, fitted to the target's bucket
    # the flipped sample's control is the mirror of the other's: not the same latent
    assert not torch.allclose(by_flip[("00_sun.png", True)], by_flip[("00_sun.png", False)], atol=1e-3)


def test_flip_mirrors_the_control_with_its_target(cached):
    prepared = check_dataset(cached.config.data, progress=False, kontext=True)
    items = {(i.sample.source, i.sample.flip): i for i in prepared.items}
    plain, flipped = items[("00_sun.png", False)], items[("00_sun.png", True)]
    a, b = controls.control_image(plain), controls.control_image(flipped)
    assert a.size == b.size == (plain.sample.width, plain.sample.height)
    assert np.array_equal(np.asarray(ImageOps.mirror(a)), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("flip", [False, True])
def test_a_control_gets_its_targets_crop_and_flip(flip):
    # A picture that is its own control, of another shape than its bucket: after the same transform they must be
    # equal, pixel for pixel; the same picture at twice the size, nearly so (resized to cover the same bucket).
    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((12, 20, 3)) * 255).astype(np.uint8)).resize((200, 120), Image.NEAREST)
    data, big = _png(picture), _png(picture.resize((400, 240), Image.NEAREST))
    sid = sample_id(data, "c", flip=flip, control=data)
    sample = Sample(sid, "c", caption_id("c"), "x.png", 128, 64, flip)
    same = Item(sample, Record("x.png", "c", lambda: data, control=lambda: data), crop="random")
    target = np.asarray(same.image(), dtype=np.float32)
    assert np.array_equal(np.asarray(controls.control_image(same), dtype=np.float32), target)
    bigger = Item(sample, Record("x.png", "c", lambda: data, control=lambda: big), crop="random")
    assert np.abs(np.asarray(controls.control_image(bigger), dtype=np.float32) - target).mean() < 8
    unflipped = np.asarray(Item(Sample(sid.removesuffix("-flip"), "c", caption_id("c"), "x.png", 128, 64, False),
                                same.record, crop="random").image(), dtype=np.float32)
    assert np.array_equal(target, unflipped[:, ::-1] if flip else unflipped)  # the flip (or none) is there


def test_load_sample_gives_control_latents_and_a_bad_control_is_a_broken_file(cached, tmp_path):
    sid = check_dataset(cached.config.data, progress=False, kontext=True).items[0].sample.id
    sample = latents.load_sample(cached.dir, sid)
    assert set(sample) == {"latent_mean", "latent_std", "control_latents"}
    assert torch.equal(sample["control_latents"], load_tensors(latents.latent_path(cached.dir, sid))["control"])
    path = latents.latent_path(cached.dir, sid)
    backup = tmp_path / "backup.safetensors"
    shutil.copyfile(path, backup)
    try:
        tensors, meta = load_tensors(path), tensors_metadata(path)
        save_tensors(path, tensors | {"control": tensors["control"][:, :-1]}, metadata=meta)
        with pytest.raises(BrokenCacheFile):
            latents.load_sample(cached.dir, sid)
    finally:
        shutil.copyfile(backup, path)


def test_an_edited_control_is_encoded_again(tiny_assets, pairs, tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(pairs.dataset, dataset)
    run = _run(tmp_path / "run", tiny_assets, dataset, flip=True)
    embeddings.embed_step(run, progress=False)
    assert latents.latents_step(run, progress=False).encoded == 16
    prepared = check_dataset(run.config.data, progress=False, kontext=True)
    assert latents.pending(run, prepared) == []
    Image.new("RGB", (64, 96), "green").save(dataset / "control" / "05_tree.png")
    prepared = check_dataset(run.config.data, progress=False, kontext=True)
    assert sorted(i.record.source for i in latents.pending(run, prepared)) == ["05_tree.png", "05_tree.png"]
    assert latents.latents_step(run, progress=False).encoded == 2
    item = next(i for i in prepared.items if i.record.source == "05_tree.png")
    saved = tensors_metadata(latents.latent_path(run.dir, item.sample.id))["control"]
    assert saved == controls.control_tag(item.record) != "none"


def test_the_kontext_config(tmp_path):
    assert BASES[KONTEXT] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert ModelConfig(base=KONTEXT).kontext and not ModelConfig().kontext
    assert DataConfig().control_column == "control_image" and DataConfig().validation_images == []
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    prompts = {"validation_prompts": ["make it red", "make it blue"]}
    with pytest.raises(ConfigError, match=r"^data.validation_images are control images for FLUX.1-Kontext-dev"):
        RunConfig().replace(data={**prompts, "validation_images": [str(image)] * 2})
    with pytest.raises(ConfigError, match="validation_images has 1 image\\(s\\) for 2 validation prompt\\(s\\)"):
        DataConfig(**prompts, validation_images=[str(image)])
    cfg = RunConfig().replace(model={"base": KONTEXT}, data={**prompts, "validation_images": [str(image)] * 2})
    assert cfg.model.model_id == BASES[KONTEXT] and cfg.data.validation_images == [str(image)] * 2


def test_relative_validation_images_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    cfg = RunConfig().replace(model={"base": KONTEXT}, data={"validation_prompts": ["edit"],
                                                             "validation_images": ["in.png"]})
    assert cfg.with_local_paths_resolved().data.validation_images == [str(tmp_path / "in.png")]


def test_validation_controls(cached, pairs, tmp_path):
    got = controls.validation_controls(cached)  # none given: the first pairs' controls, fitted to 64x96
    assert len(got) == len(VALIDATION_PROMPTS) == 2 and all(g.size == (64, 96) and g.mode == "RGB" for g in got)
    with Image.open(pairs.dataset / "control" / "00_sun.png") as first:
        assert np.array_equal(np.asarray(got[0]), np.asarray(ImageOps.fit(first.convert("RGB"), (64, 96),
                                                                           Image.Resampling.LANCZOS)))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 100), "blue").save(wide)
    run = open_run(cached.dir.root, verbose=False)
    run.config = run.config.replace(data={"validation_prompts": ["a", "b", "c"], "validation_images": [str(wide)] * 3})
    given = controls.validation_controls(run)
    assert len(given) == 3 and given[2].size == (64, 96) and given[2].getpixel((10, 10)) == (0, 0, 255)
    run.config = run.config.replace(data={"validation_images": []}).replace(
        data={"validation_prompts": ["p"] * 11})  # more prompts than pairs: the controls are cycled
    cycled = controls.validation_controls(run)
    assert len(cycled) == 11 and np.array_equal(np.asarray(cycled[8]), np.asarray(cycled[0]))
    # A file gone since (a run opened on a new machine): the config still loads; making the samples names it.
    run.config = run.config.replace(data={"validation_prompts": ["a"], "validation_images": [str(tmp_path / "gone.png")]})
    with pytest.raises(FluxnbError, match="the validation control image .*gone.png cannot be read"):
        controls.validation_controls(run)
    run.config = run.config.replace(data={"validation_images": []}).replace(
        model={"base": "FLUX.1-dev", "model_id": run.config.model.model_id})
    with pytest.raises(FluxnbError, match="validation controls are FLUX.1-Kontext-dev's input images"):
        controls.validation_controls(run)


def test_kontext_captions_are_never_invented(tmp_path, pairs):
    folder = tmp_path / "data"
    shutil.copytree(pairs.dataset, folder)
    (folder / "metadata.jsonl").unlink()  # every instruction gone
    cfg = DataConfig(dataset=str(folder))
    with pytest.raises(FluxnbError, match=r"^8 image\(s\) of .* have no instruction: 00_sun.png, 01_mountain.png"):
        plan_captions(folder, cfg, kontext=True)
    assert len(plan_captions(folder, cfg).todo) == 16  # not Kontext: the controls are images to caption too
    shutil.copyfile(pairs.dataset / "metadata.jsonl", folder / "metadata.jsonl")
    assert plan_captions(folder, cfg, kontext=True).todo == []  # all written: nothing to do, no error
    with pytest.raises(FluxnbError, match=r"8 image\(s\) .* would be captioned anew \(overwrite\)"):
        plan_captions(folder, cfg, kontext=True, overwrite=True)


def test_a_tiny_kontext_run_defaults_to_the_paired_dataset(tiny_assets, pairs, tmp_path):
    tiny = RunConfig(profile="tiny").replace(
        data={"dataset": str(tiny_assets.dataset), "validation_prompts": list(tiny_assets.validation_prompts)},
        model={"model_id": str(tiny_assets.model)})
    kontext = tiny_data_for_base(tiny.replace(model={"base": KONTEXT}))
    assert kontext.data.dataset == str(pairs.dataset) and kontext.data.validation_prompts == VALIDATION_PROMPTS
    back = tiny_data_for_base(kontext.replace(model={"base": "FLUX.1-dev"}))
    assert back.data.dataset == str(tiny_assets.dataset)
    assert back.data.validation_prompts == list(tiny_assets.validation_prompts)
    assert tiny_data_for_base(tiny) == tiny  # FLUX.1-dev on the drawings: nothing moves
    mine = tiny.replace(model={"base": KONTEXT}, data={"dataset": str(tmp_path)})
    assert tiny_data_for_base(mine).data.dataset == str(tmp_path)  # a dataset of the user's stays
    tiny.replace(model={"base": KONTEXT}).save(tmp_path / "run")  # a config.json with the base changed by hand
    assert open_run(tmp_path / "run", verbose=False).config.data.dataset == str(pairs.dataset)
    records = load_records(kontext.data, kontext=True).records
    assert len(records) == 8 and all(r.control is not None for r in records)
    assert all(r.caption.startswith("turn the ") for r in records)
