"""Dataset loading and checking (fluxnb.sources, fluxnb.data) and buckets (fluxnb.buckets): every bad-input class."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxnb.config import DataConfig
from fluxnb.data import DataError, check_dataset
from fluxnb.data.buckets import fit_to_bucket, make_buckets, nearest_bucket, to_rgb
from fluxnb.data.store import sample_id
from fluxnb.base.errors import FluxnbError


def png(size=(64, 96), color=(200, 40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(size=(64, 96)) -> bytes:
    """Incompressible, so cutting the file short really cuts image data."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size=(64, 96), color=(20, 200, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def folder(tmp_path: Path, rows: list[tuple[str, bytes, object]], layout: str = "jsonl") -> Path:
    """Write images and captions: layout "jsonl" (imagefolder metadata.jsonl) or "txt" (same-name .txt files).
    A caption of ... (Ellipsis) writes no caption at all for that row."""
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for name, data, caption in rows:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        if layout == "txt" and caption is not ...:
            (root / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        if layout == "jsonl":
            lines.append(json.dumps({"file_name": name} | ({} if caption is ... else {"text": caption})))
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=str(root), width=64, height=96, **kw)


def check(root: Path, tokenizer=None, **kw):
    return check_dataset(cfg(root, **kw), tokenizer, progress=False)


# --- loading ---------------------------------------------------------------------------------------------------


def test_imagefolder_layout(tmp_path):
    root = folder(tmp_path, [("a.png", png(), "a red square"), ("sub/b.jpg", jpeg((96, 64)), "a green one")])
    p = check(root)
    assert [s.caption for s in p.samples] == ["a red square", "a green one"]
    assert [s.source for s in p.samples] == ["a.png", "sub/b.jpg"]
    assert [(s.width, s.height) for s in p.samples] == [(64, 96), (96, 64)]
    assert p.samples[0].id == sample_id((root / "a.png").read_bytes(), "a red square")
    assert "metadata.jsonl" in str(p.report) and "2 rows -> 2 samples" in str(p.report)


def test_txt_pairs_layout_and_caption_whitespace(tmp_path):
    root = folder(tmp_path, [("x/one.png", png(), "  first\ncaption "), ("two.png", png(), "second")], layout="txt")
    p = check(root)
    assert sorted(s.caption for s in p.samples) == ["first caption", "second"]
    assert ".txt captions" in p.report.description


def test_other_caption_column_and_instance_prompt(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(png())
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "a cat"}) + "\n")
    p = check(root, caption_column="prompt", instance_prompt="tnyst style")
    assert p.samples[0].caption == "tnyst style, a cat"
    with pytest.raises(DataError, match=r"no 'text' column \(it has: file_name, prompt\)"):
        check(root)


def test_flip_samples_have_their_own_ids(tmp_path):
    p = check(folder(tmp_path, [("a.png", png(), "cap")]), flip=True)
    plain, flipped = p.samples
    assert flipped.flip and flipped.id == plain.id + "-flip" and flipped.caption_id == plain.caption_id
    a, b = (np.asarray(i.image()) for i in p.items)
    assert np.array_equal(a[:, ::-1], b)


def test_a_file_changed_after_the_check_is_refused(tmp_path):
    root = folder(tmp_path, [("a.png", png(), "cap")])
    item = check(root).items[0]
    (root / "a.png").write_bytes(png(color=(0, 0, 255)))  # edited between notebook 01's check and 02's encode
    with pytest.raises(FluxnbError, match="a.png changed on disk"):
        item.image()


def test_hub_id_without_network_is_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FluxnbError) as err:
        check_dataset(DataConfig(dataset="derekl35/alphonse-mucha-style"), progress=False)
    msg = str(err.value)
    assert "derekl35/alphonse-mucha-style" in msg and "internet" in msg and "local folder" in msg
    assert "Traceback" not in msg


def test_missing_local_folder(tmp_path):
    with pytest.raises(FluxnbError, match="does not exist"):
        check_dataset(DataConfig(dataset=str(tmp_path / "nope" / "here")), progress=False)


def _reads(monkeypatch) -> list[str]:
    """The names of the files read from now on."""
    read, real = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    return read


def test_files_outside_the_dataset_folder_are_refused_unread(tmp_path, monkeypatch):
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(png(color=(1, 2, 3)))
    root = folder(tmp_path, [("a.png", png(), "inside"), ("sub/../b.png", png(), "inside too")])
    (root / "link.png").symlink_to(secret)
    escapes = ["../outside/secret.png", str(secret), "link.png", "../" * 30 + "etc/passwd"]
    with open(root / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps({"file_name": name, "text": "escape"}) + "\n" for name in escapes)
    read = _reads(monkeypatch)
    with pytest.raises(DataError, match=r"4 row\(s\) name a file outside the dataset folder .*: metadata.jsonl line 3 "
                                        r"\(\.\./outside/secret.png\), metadata.jsonl line 4 .* copy those images"):
        check(root)
    assert sorted(read) == ["a.png", "b.png"]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "link.png").symlink_to(secret)
    (pairs / "link.txt").write_text("a caption")
    with pytest.raises(DataError, match=r"1 row\(s\) name a file outside the dataset folder .*: link.png"):
        check(pairs)


def test_a_hub_dataset_must_hold_images_not_paths_to_local_files(tmp_path, monkeypatch):
    import datasets

    local = tmp_path / "private.png"
    local.write_bytes(png())
    paths = datasets.Dataset.from_dict({"image": [str(local)], "text": ["a path as text"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: paths)
    with pytest.raises(FluxnbError, match=r"column 'image' holds Value\('string'\), not images"):
        check(Path("user/paths"))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(local)}, {"bytes": png(), "path": None}],
                                         "text": ["a path as an image", "an image"]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: images)
    read = _reads(monkeypatch)
    p = check(Path("user/paths"))
    assert [s.source for s in p.samples] == ["row 1"] and not read
    assert "row 0: its image is the path of a local file" in "\n".join(p.report.skipped)


# --- bad images ------------------------------------------------------------------------------------------------


def test_corrupt_truncated_and_missing_files_are_skipped_by_name(tmp_path):
    good = png()
    rows = [("ok.png", good, "fine"), ("junk.png", b"this is not an image", "junk"),
            ("cut.png", noise_png()[:4000], "cut"), ("cut.jpg", jpeg()[:300], "cut jpeg")]
    root = folder(tmp_path, rows)
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "missing file"}) + "\n")
    p = check(root)
    assert [s.source for s in p.samples] == ["ok.png"]
    skipped = "\n".join(p.report.skipped)
    assert "junk.png: not an image" in skipped
    assert "cut.png: truncated" in skipped and "cut.jpg: truncated" in skipped
    assert "gone.png: file not found" in skipped
    with pytest.raises(DataError, match=r"4 image\(s\) cannot be used: junk.png"):
        check(root, bad_images="error")


def test_bad_metadata_line_is_named(tmp_path):
    root = folder(tmp_path, [("a.png", png(), "a")])
    with open(root / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match="metadata.jsonl line 2 is not valid JSON"):
        check(root)


@pytest.mark.parametrize("mode, make, expected", [
    ("RGBA", lambda: Image.new("RGBA", (64, 96), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
    ("P", lambda: Image.new("RGB", (64, 96), (200, 40, 40)).convert("P", palette=Image.Palette.ADAPTIVE),
     (200, 40, 40)),
    ("CMYK", lambda: Image.new("CMYK", (64, 96), (0, 255, 255, 0)), (255, 0, 0)),
    ("L", lambda: Image.new("L", (64, 96), 77), (77, 77, 77)),
    ("I;16", lambda: Image.fromarray(np.full((96, 64), 32896, np.uint16)), (128, 128, 128)),  # scaled, not clipped
])
def test_non_rgb_modes_are_converted_and_said_once(tmp_path, mode, make, expected):
    buf = io.BytesIO()
    img = make()
    assert img.mode == mode
    img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    root = folder(tmp_path, [("a.png", buf.getvalue(), "one"), ("b.png", buf.getvalue(), "two")])
    p = check(root)
    notes = [n for n in p.report.notes if "not 8-bit RGB" in n]
    assert len(notes) == 1 and f"{mode} x2" in notes[0]
    out = p.items[0].image()
    assert out.mode == "RGB" and out.getpixel((32, 48)) == pytest.approx(expected, abs=2)


def test_exif_rotated_photos_are_turned_upright(tmp_path):
    img = Image.new("RGB", (96, 64), (10, 20, 30))  # stored landscape, EXIF says "rotate 90": shown portrait
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    p = check(folder(tmp_path, [("phone.jpg", buf.getvalue(), "a photo")]))
    assert (p.samples[0].width, p.samples[0].height) == (64, 96)
    assert any("1 photo(s) turned upright" in n for n in p.report.notes)


def test_to_rgb_keeps_palette_transparency_on_white():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 255, 255, 0, 0])
    img.info["transparency"] = 1  # palette entry 1 (red) is see-through
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    img.info.pop("transparency")
    assert to_rgb(img).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_images_smaller_than_their_bucket(tmp_path, policy):
    root = folder(tmp_path, [("small.png", png((32, 48)), "small"), ("big.png", png((128, 192)), "big")])
    p = check(root, small_images=policy)
    warning = "\n".join(p.report.warnings)
    assert "small.png 32x48 -> 64x96" in warning and "big.png" not in warning
    assert [s.source for s in p.samples] == (["small.png", "big.png"] if policy == "warn" else ["big.png"])


# --- captions --------------------------------------------------------------------------------------------------


def test_missing_empty_and_non_string_captions_name_the_rows(tmp_path):
    rows = [("ok.png", png(), "fine"), ("none.png", png(color=(1, 1, 1)), ...),
            ("empty.png", png(color=(2, 2, 2)), "  "), ("num.png", png(color=(3, 3, 3)), 42),
            ("null.png", png(color=(4, 4, 4)), None)]
    root = folder(tmp_path, rows)
    with pytest.raises(DataError) as err:
        check(root)
    msg = str(err.value)
    expected = [("none.png", "missing"), ("empty.png", "empty"), ("num.png", "not text"), ("null.png", "missing")]
    for name, why in expected:
        assert f"{name} ({why}" in msg
    assert "4 row(s) have no usable caption" in msg and "instance_prompt" in msg
    p = check(root, instance_prompt="tnyst style")  # ... or the instance prompt captions them
    assert [s.caption for s in p.samples] == ["tnyst style, fine"] + ["tnyst style"] * 4
    assert any("4 row(s) without a caption use the instance prompt" in n for n in p.report.notes)


def test_txt_layout_missing_caption_file(tmp_path):
    root = folder(tmp_path, [("a.png", png(), "cap"), ("b.png", png(color=(9, 9, 9)), ...)], layout="txt")
    with pytest.raises(DataError, match=r"b.png \(missing\)"):
        check(root)


def test_long_captions_are_counted_in_t5_tokens(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.model, subfolder="tokenizer_2")
    long = "a cat sitting on a red chair in the garden under the sun"
    root = folder(tmp_path, [("a.png", png(), long), ("b.png", png(color=(5, 5, 5)), "a cat")])
    p = check(root, tok, max_sequence_length=8)
    warning = next(w for w in p.report.warnings if "max_sequence_length=8" in w)
    n = len(tok(long).input_ids)
    assert n > 8 and "1 of 2 caption(s)" in warning and f"longest: {n} tokens" in warning
    assert not check(root, tok, max_sequence_length=77).report.warnings


# --- duplicates, empty -----------------------------------------------------------------------------------------


def test_duplicates(tmp_path):
    img = png()
    root = folder(tmp_path, [("a.png", img, "same"), ("b.png", img, "same"), ("c.png", img, "other caption")])
    p = check(root)
    assert [s.source for s in p.samples] == ["a.png", "c.png"]
    notes = "\n".join(p.report.notes)
    assert "1 duplicate row(s)" in notes and "b.png = a.png" in notes
    assert "appear twice with different captions (both kept): c.png = a.png" in notes


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable samples: the dataset is empty"):
        check(tmp_path / "empty")


def test_every_row_bad_is_an_error_not_an_empty_cache(tmp_path):
    with pytest.raises(DataError, match="no usable samples"):
        check(folder(tmp_path, [("junk.png", b"nope", "junk")]))


# --- buckets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w, h, step", [(512, 768, 64), (1024, 1024, 64), (64, 96, 64), (528, 784, 32)])
def test_make_buckets_properties(w, h, step):
    buckets = make_buckets(w, h, step)
    assert (w, h) in buckets and (h, w) in buckets
    for bw, bh in buckets:
        assert bw % 16 == 0 and bh % 16 == 0
        assert bw * bh <= w * h
        assert max(bw / bh, bh / bw) <= max(2.0, w / h, h / w)
    ratios = [bw / bh for bw, bh in buckets]
    assert ratios == sorted(ratios)


def test_make_buckets_blog_size():
    assert make_buckets(512, 768) == [(448, 832), (512, 768), (512, 704), (576, 640), (640, 576), (704, 512),
                                      (768, 512), (832, 448)]
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(500, 768)


def test_nearest_bucket_by_aspect_ratio():
    buckets = make_buckets(512, 768)
    assert nearest_bucket(1200, 800, buckets) == (768, 512)
    assert nearest_bucket(800, 1200, buckets) == (512, 768)
    assert nearest_bucket(1000, 1000, buckets) in {(576, 640), (640, 576)}
    assert nearest_bucket(100, 1000, buckets) == (448, 832)  # very tall: the tallest bucket
    # log-space distance: 2:1 and 1:2 equally far from square
    assert math.isclose(abs(math.log(2)), abs(math.log(0.5)))


def test_fit_to_bucket_crops_centre_or_seeded_random():
    img = Image.fromarray(np.arange(200 * 100 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8))
    assert fit_to_bucket(img, (64, 96)).size == (64, 96)
    a = np.asarray(fit_to_bucket(img, (64, 64), "random", key="s1"))
    assert np.array_equal(a, np.asarray(fit_to_bucket(img, (64, 64), "random", key="s1")))
    assert not np.array_equal(a, np.asarray(fit_to_bucket(img, (64, 64), "random", key="s2")))


def test_buckets_off_puts_everything_at_the_target(tmp_path):
    root = folder(tmp_path, [("wide.png", png((192, 128)), "wide"), ("tall.png", png((64, 96)), "tall")])
    p = check(root, buckets=False)
    assert {(s.width, s.height) for s in p.samples} == {(64, 96)}
    assert check(root).samples[0].width == 96  # with buckets the wide image stays wide


@pytest.mark.parametrize("kw, field", [({"bucket_step": 40}, "bucket_step"), ({"bad_images": "ignore"}, "bad_images")])
def test_new_data_fields_are_validated(kw, field):
    from fluxnb.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        DataConfig(**kw)


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_metadata_with_a_byte_order_mark_loads(tmp_path, layout):
    """Excel's "CSV UTF-8" and some Windows editors start the file with a BOM."""
    root = folder(tmp_path, [("a.png", png(), "a red square"), ("b.png", png(color=(1, 2, 3)), "line one\nline two")])
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    if layout == "csv":
        (root / "metadata.jsonl").unlink()
        body = "file_name,text\n" + "".join(f'{r["file_name"]},"{r["text"]}"\n' for r in rows)
        (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    else:
        (root / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (root / "metadata.jsonl").read_bytes())
    prepared = check(root)  # a quoted multi-line CSV caption stays one caption (whitespace is normalised)
    assert sorted(s.caption for s in prepared.samples) == ["a red square", "line one line two"]
