"""Proof that the style was learnt (fluxnb.infer.effect) on the tiny profile, with controls that must not move.

One tiny LoRA is trained for this module (the tiny profile's recipe, no sample grids). The measurement: latent
channel statistics of images generated for the validation prompts, as a distance to the training images'.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from train_helpers import make_run

from fluxnb.infer import effect, sampling
from fluxnb.model import lora
from fluxnb.train import load_for_training, train, validation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is 32 wide: on the CPU one thread is faster than several (as in fluxnb.train.loop)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("styled") / "run", tmp_path_factory,
                   train={"max_train_steps": 100, "sample_every": 0, "checkpoint_every": 50, "validate_every": 50})
    train(run, live=False)
    return run


@pytest.fixture(scope="module")
def pipe(trained):
    pipe = sampling.load_pipeline(trained)
    pipe.set_progress_bar_config(disable=True)
    sampling.load_lora(pipe, trained.dir.lora_file)
    return pipe


@pytest.fixture
def settings(trained):
    return dataclasses.replace(sampling.default_settings(trained), steps=4)


def test_the_trained_lora_moves_generated_images_toward_the_training_images(trained, pipe, settings):
    proof = effect.style_proof(pipe, trained, settings)
    print(proof)
    assert proof.learned and proof.lora < proof.base, str(proof)


def test_negative_control_scale_zero_does_not_move_and_the_check_fails(trained, pipe, settings):
    proof = effect.style_proof(pipe, trained, settings, scale=0.0)
    print(proof)
    assert abs(proof.moved) < 1e-6 and not proof.learned and "NOT learnt" in str(proof)


def test_negative_control_an_untrained_adapter_does_not_move(trained, settings, tmp_path):
    untrained = load_for_training(trained)  # the seeded LoRA before step 1: B = 0, so exactly the base
    folder = lora.save_lora(untrained, tmp_path / "untrained").parent
    pipe = sampling.load_pipeline(trained)
    pipe.set_progress_bar_config(disable=True)
    sampling.load_lora(pipe, folder / trained.dir.lora_file.name)
    proof = effect.style_proof(pipe, trained, settings)
    print(proof)
    assert not proof.learned and abs(proof.moved) < 1e-3


def test_lora_effect_warns_when_negligible(trained, pipe, settings):
    prompts = trained.config.data.validation_prompts[:2]
    base, styled = sampling.base_vs_lora(pipe, prompts, settings, trained)
    seen = effect.lora_effect(base, styled, prompts)
    assert not seen.negligible and "WARNING" not in str(seen)
    off = effect.lora_effect(*sampling.base_vs_lora(pipe, prompts, dataclasses.replace(settings, lora_scale=0.0),
                                                   trained), prompts)
    assert off.negligible and "WARNING" in str(off)
    sampling.set_scale(pipe, 1.0)


def test_notebook_04_can_load_the_best_checkpoint(trained, settings):
    best = validation.best_lora(trained.dir)
    assert best is not None and best.is_file() and best.parent.parent == trained.dir.checkpoints
    pipe = sampling.load_pipeline(trained)
    pipe.set_progress_bar_config(disable=True)
    sampling.load_lora(pipe, best)
    image, = sampling.generate(pipe, [settings.prompt], settings, trained)
    assert image.size == (settings.width, settings.height)
