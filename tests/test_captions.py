"""Captions written for you (fluxnb.data.captions, fluxnb.data.captioner): the tiny Florence-2 and BLIP through the
real path, the captioners refused with one line before any weights load, and what is never lost."""

from __future__ import annotations

import json

import pytest

from fluxnb.base import memory
from fluxnb.config import DataConfig
from fluxnb.data import captioner, captions, embeddings
from fluxnb.data.sources import load_records
from fluxnb.base.errors import FluxnbError
from fluxnb.run.hardware import detect
from fluxnb.run import open_run
from fluxnb.tiny.captioner import ensure_tiny_captioner, uncaptioned_copy

TRIGGER = "tnyst style"


def rows(folder):
    return {r["file_name"]: r for r in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())}


def fake_captioner(images):
    return [f"a picture {im.width}x{im.height}" for im in images]


@pytest.fixture(scope="module", params=["florence2", "blip"])
def tiny_captioner(request):
    return captioner.load_captioner(str(ensure_tiny_captioner(family=request.param)), detect("tiny"))


def test_tiny_captioners_caption_an_uncaptioned_folder_into_metadata_jsonl(tiny_assets, tiny_captioner, tmp_path):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    cfg = DataConfig(dataset=str(folder))
    assert all(r.caption is None for r in load_records(cfg).records)  # before: images alone, no caption
    plan = captions.plan_captions(folder, cfg)
    assert len(plan.todo) == len(plan.rows) == 16 and plan.kept == 0
    result = captions.caption_folder(plan, tiny_captioner, trigger=TRIGGER, progress=False)
    assert result.written == folder / "metadata.jsonl" and len(result.captioned) == 16
    loaded = load_records(cfg)  # the imagefolder layout fluxnb.data.sources reads
    assert not loaded.errors and len(loaded.records) == 16
    assert all(r.caption.startswith(f"{TRIGGER}, ") and len(r.caption) > len(TRIGGER) + 2 for r in loaded.records)


def test_user_captions_are_kept_unless_overwrite(tmp_path, tiny_assets):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    names = sorted(p.name for p in folder.glob("*.png"))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": names[0], "text": "my own words", "rating": 5}) + "\n"
        + json.dumps({"file_name": names[1], "text": "  "}) + "\n")  # an empty caption gets one; the rest are unlisted
    cfg = DataConfig(dataset=str(folder))
    plan = captions.plan_captions(folder, cfg)
    assert plan.kept == 1 and len(plan.todo) == 15
    captions.caption_folder(plan, fake_captioner, trigger=TRIGGER, progress=False)
    after = rows(folder)
    assert after[names[0]] == {"file_name": names[0], "text": "my own words", "rating": 5}
    assert after[names[1]]["text"].startswith(TRIGGER) and set(after) == set(names)

    again = captions.plan_captions(folder, cfg)  # captioning twice changes nothing
    assert not again.todo and captions.caption_folder(again, fake_captioner, progress=False).written is None

    everything = captions.plan_captions(folder, cfg, overwrite=True)
    captions.caption_folder(everything, fake_captioner, trigger=TRIGGER, progress=False)
    assert rows(folder)[names[0]]["text"].startswith(f"{TRIGGER}, a picture") and rows(folder)[names[0]]["rating"] == 5


def test_every_row_the_user_wrote_is_kept_as_written(tmp_path, tiny_assets):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    names = sorted(p.name for p in folder.glob("*.png"))
    theirs = [json.dumps({"file_name": "later.png", "text": "an image not copied in yet"}),
              json.dumps({"text": "my own words", "file_name": f"./{names[0]}"}),  # the same file as names[0]
              json.dumps({"file_name": names[1], "text": "the first of two rows"}),
              json.dumps({"file_name": names[1], "text": "the second of two rows"}),
              '{"file_name":"%s","text":"caf\\u00e9", "rating": 5}' % names[2]]  # spacing and escapes as typed
    (folder / "metadata.jsonl").write_text("\n".join(theirs) + "\n")
    plan = captions.plan_captions(folder, DataConfig(dataset=str(folder)))
    assert plan.kept == 4 and len(plan.todo) == 13
    captions.caption_folder(plan, fake_captioner, trigger=TRIGGER, progress=False)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert lines[:5] == theirs, "a row the user wrote was dropped or changed"
    new = [json.loads(line) for line in lines[5:]]  # only the images without a row get one
    assert [r["file_name"] for r in new] == names[3:] and all(r["text"].startswith(TRIGGER) for r in new)


def test_txt_captions_beside_the_images_are_copied_in(tmp_path, tiny_assets):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    first = sorted(folder.glob("*.png"))[0]
    first.with_suffix(".txt").write_text("written by hand\n")
    plan = captions.plan_captions(folder, DataConfig(dataset=str(folder)))
    captions.caption_folder(plan, fake_captioner, progress=False)
    assert rows(folder)[first.name]["text"] == "written by hand" and plan.kept == 1


def test_refuses_what_it_cannot_caption_without_loss(tmp_path):
    with pytest.raises(FluxnbError, match="local folder"):
        captions.plan_captions("user/some-hub-dataset", DataConfig())
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(FluxnbError, match="none of your captions is lost"):
        captions.plan_captions(tmp_path, DataConfig(dataset=str(tmp_path)))
    assert "not json" in (tmp_path / "metadata.jsonl").read_text()


def test_warns_when_t5_would_cut_a_caption(tmp_path, tiny_assets):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    tokenizer = embeddings.load_tokenizer(run.config.model)
    plan = captions.plan_captions(folder, DataConfig(dataset=str(folder)))
    long = lambda images: ["a cat " * 40 for _ in images]  # noqa: E731
    result = captions.caption_folder(plan, long, tokenizer=tokenizer, max_sequence_length=77, progress=False)
    assert len(result.warnings) == 1 and "longer than max_sequence_length=77" in result.warnings[0]
    short = captions.caption_folder(captions.plan_captions(folder, DataConfig(dataset=str(folder)), overwrite=True),
                                    fake_captioner, tokenizer=tokenizer, progress=False)
    assert not short.warnings


def test_cli_captions_and_frees_the_captioner_before_t5(tmp_path, tiny_assets, monkeypatch):
    from fluxnb.cli import main

    freed = []
    real_free = memory.free
    monkeypatch.setattr(memory, "free", lambda *objs: freed.extend(objs) or real_free(*objs))
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    run_dir = tmp_path / "run"
    assert main(["caption", "--run-dir", str(run_dir), "--profile", "tiny", "--dataset", str(folder),
                 "--instance-prompt", TRIGGER]) == 0
    assert len(rows(folder)) == 16 and all(r["text"].startswith(TRIGGER) for r in rows(folder).values())
    assert len(freed) == 1 and sum(p.numel() for p in freed[0].parameters()) == 0  # emptied in place
    assert json.loads((run_dir / "config.json").read_text())["data"]["dataset"] == str(folder)


def test_the_tiny_profile_captions_with_a_florence_2_like_the_real_default(tmp_path):
    run = open_run(tmp_path / "run", profile="tiny", verbose=False)
    assert DataConfig().captioner == captioner.DEFAULT == "florence-community/Florence-2-large"
    assert captioner.family_of(run.config.data.captioner).name == "Florence-2"


def _config_only(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_captioners_fluxnb_cannot_run_are_refused_in_one_line_before_any_weights_load(tmp_path, monkeypatch):
    remote = _config_only(tmp_path / "remote", model_type="florence2",
                          auto_map={"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"})
    with pytest.raises(captioner.CaptionerError, match="remote code.*florence-community/Florence-2-large"):
        captioner.load_captioner(remote, detect("tiny"))  # no weights there: the config alone decides
    other = _config_only(tmp_path / "other", model_type="llava")
    with pytest.raises(captioner.CaptionerError, match="'llava' model; fluxnb captions with Florence-2"):
        captioner.load_captioner(other, detect("tiny"))
    qwen = _config_only(tmp_path / "qwen", model_type="qwen3_vl")
    monkeypatch.setattr(captioner.importlib.util, "find_spec", lambda name: None)  # as on a machine without it
    with pytest.raises(captioner.CaptionerError, match="Qwen-VL captioners .* need torchvision"):
        captioner.load_captioner(qwen, detect("tiny"))


def test_the_captioner_is_freed_even_when_captioning_fails(tmp_path, tiny_assets):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    plan = captions.plan_captions(folder, DataConfig(dataset=str(folder)))
    (folder / plan.files[plan.todo[-1]]).write_bytes(b"not a picture")  # the last batch cannot be opened
    with pytest.raises(FluxnbError, match=f"{plan.files[plan.todo[-1]]} in .* cannot be captioned"):
        with captioner.loaded(str(ensure_tiny_captioner()), detect("tiny")) as model:
            captions.caption_folder(plan, model, progress=False)
    assert model.freed is not None and sum(p.numel() for p in model.model.parameters()) == 0


def test_captions_made_before_a_failure_are_saved_and_not_made_again(tmp_path, tiny_assets, capsys):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    cfg = DataConfig(dataset=str(folder))
    plan = captions.plan_captions(folder, cfg)
    calls = []

    def dies_on_the_third_batch(images):
        calls.append(len(images))
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return fake_captioner(images)

    with pytest.raises(MemoryError):
        captions.caption_folder(plan, dies_on_the_third_batch, trigger=TRIGGER, batch_size=4, progress=False)
    assert "captioning stopped after 8 of 16 images" in capsys.readouterr().out
    saved = {name: r for name, r in rows(folder).items() if r.get("text")}
    assert len(saved) == 8 and all(r["text"].startswith(TRIGGER) for r in saved.values())
    again = captions.plan_captions(folder, cfg)  # the rest, and only the rest
    assert again.kept == 8 and len(again.todo) == 8
    assert {again.files[i] for i in again.todo} == set(rows(folder)) - set(saved)


def test_an_unreadable_image_stops_captioning_naming_it_and_the_captions_before_it_are_saved(tmp_path, tiny_assets,
                                                                                           capsys):
    folder = uncaptioned_copy(tiny_assets.dataset, tmp_path / "pictures")
    cfg = DataConfig(dataset=str(folder))
    plan = captions.plan_captions(folder, cfg)
    broken = plan.files[plan.todo[9]]  # in the third batch of four
    (folder / broken).write_bytes(b"not a picture")
    with pytest.raises(FluxnbError) as err:
        captions.caption_folder(plan, fake_captioner, trigger=TRIGGER, batch_size=4, progress=False)
    assert str(err.value) == (f"{broken} in {folder} cannot be captioned: not an image PIL can read (corrupt, or not "
                              "an image format): re-export it as PNG/JPEG or delete it.")
    out = capsys.readouterr().out
    assert "captioning stopped after 8 of 16 images" in out
    assert "run it again with overwrite off (OVERWRITE = False in notebook 01, no --all on the command line)" in out
    assert len([r for r in rows(folder).values() if r.get("text")]) == 8
