"""A FLUX.1-Kontext-dev run end to end on the tiny profile: the CLI's embed, latents and train on the generated
pairs, then notebook 04's calls (FluxKontextPipeline, the input row of the grid), the export and the model card."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fluxnb.base.errors import FluxnbError
from fluxnb.cli import main
from fluxnb.config import KONTEXT
from fluxnb.infer import export, sampling
from fluxnb.run import open_run
from fluxnb.share.card import card_text


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext") / "run"
    assert main(["embed", "--run-dir", str(root), "--profile", "tiny", "--base", KONTEXT]) == 0
    assert main(["latents", "--run-dir", str(root), "--profile", "tiny"]) == 0
    assert main(["train", "--run-dir", str(root), "--max-steps", "2"]) == 0
    return open_run(root, profile="tiny", verbose=False)


@pytest.fixture(scope="module")
def pipe(run):
    pipe = sampling.load_pipeline(run)
    pipe.set_progress_bar_config(disable=True)
    sampling.load_lora(pipe, run.dir.lora_file)
    return pipe


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_the_cli_trains_on_the_pairs(run):
    from fluxnb.tiny.pairs import ensure_tiny_pairs

    assert run.config.model.kontext and run.config.data.dataset == str(ensure_tiny_pairs().dataset)
    assert run.dir.lora_file.is_file()


def test_notebook_04_edits_each_validation_control_at_the_training_size(run, pipe):
    from diffusers import FluxKontextPipeline

    assert isinstance(pipe, FluxKontextPipeline)
    settings = sampling.SampleSettings(prompt="x", steps=2, width=run.config.data.width, height=run.config.data.height)
    prompts = run.config.data.validation_prompts[:2]
    inputs = sampling.edit_inputs(run, prompts)
    assert len(inputs) == 2 and all(im.size == (settings.width, settings.height) for im in inputs)
    base, styled = sampling.base_vs_lora(pipe, prompts, settings, run, controls=inputs)
    assert all(im.size == (settings.width, settings.height) for im in base + styled)  # not Kontext's ~1 MP
    assert np.abs(pixels(base) - pixels(styled)).mean() > 0  # the LoRA acts
    # The same prompt and seed on another input image: another result (the control reaches the model; the tiny
    # random model moves by about 1 of 255 for an inverted input).
    other = [Image.fromarray(255 - np.asarray(inputs[0]))]
    assert np.abs(pixels(sampling.generate(pipe, prompts[:1], settings, run, controls=other))
                  - pixels(styled[:1])).mean() > 0.3
    # run= alone: the run's own validation controls, as notebook 04's later cells call it.
    assert np.array_equal(pixels(sampling.generate(pipe, prompts[:1], settings, run)), pixels(styled[:1]))
    fig = sampling.save_grid(run.dir.comparison, prompts, base, styled, inputs=inputs)
    assert len(fig.axes) == 6 and fig.axes[0].get_title().startswith("input:")
    with pytest.raises(FluxnbError, match="2 prompt\\(s\\) but 1 control image"):
        sampling.generate(pipe, prompts, settings, run, controls=inputs[:1])


def test_a_kontext_lora_exports_and_its_card_says_how_to_edit_with_it(run, tmp_path):
    comfy = export.export_lora(run.dir.lora_file, "comfyui", tmp_path / "kontext_comfyui.safetensors")
    trip = export.check_round_trip(run.dir.lora_file, comfy)
    assert trip.checked > 0 and trip.max_error < 1e-2
    card = card_text(run, "", comfy.name, [], "me/kontext-lora")
    assert "pipeline_tag: image-to-image" in card and "text-to-image" not in card
    assert "FluxKontextPipeline.from_pretrained" in card and 'image=load_image("your-image.png"), max_area=64 * 96,' in card


def test_a_control_of_another_shape_is_fitted_like_a_training_pair_and_read_once_per_comparison(run, pipe,
                                                                                                 monkeypatch):
    settings = sampling.SampleSettings(prompt="x", steps=1, width=run.config.data.width, height=run.config.data.height)
    wide = Image.new("RGB", (300, 100), "white")
    wide.paste((255, 0, 0), (0, 0, 100, 100))  # red left third, white elsewhere: a stretch would keep the red
    given = sampling.kontext_inputs(pipe, ["x"], settings, run, [wide])[0]
    assert given["image"].size == (64, 96) and given["max_area"] == 64 * 96 and not given["_auto_resize"]
    assert given["image"].getpixel((0, 48)) == (255, 255, 255)  # covered and center-cropped: the red is cut off
    calls = []
    real = sampling.edit_inputs
    monkeypatch.setattr(sampling, "edit_inputs", lambda *a: calls.append(a) or real(*a))
    sampling.base_vs_lora(pipe, ["x"], settings, run)  # base and LoRA edit the same controls, read once
    assert len(calls) == 1


def test_the_cards_gallery_shows_each_edited_input_beside_its_result(run, pipe):
    from fluxnb.share import hub

    settings = sampling.SampleSettings(prompt="x", steps=1, width=run.config.data.width, height=run.config.data.height)
    prompts = run.config.data.validation_prompts[:2]
    inputs = sampling.edit_inputs(run, prompts)
    sampling.save_images(run.dir.gallery, prompts, sampling.generate(pipe, prompts, settings, run), settings,
                         inputs=inputs)
    staged = hub.stage(run, hub.default_settings(run))
    assert np.array_equal(pixels([Image.open(staged.folder / "images" / "01_input.png")]), pixels(inputs[1:]))
    card = (staged.folder / "README.md").read_text()
    assert "| input | result | instruction |" in card
    assert f"| ![input](images/00_input.png) | ![{prompts[0]}](images/00.png) | {prompts[0]} (seed" in card
