"""The captioning model of notebook 01, whichever family it is: one table says how each family is asked.

    with loaded(cfg.data.captioner, run.hw) as captioner:   # freed on the way out, also on an error,
        texts = captioner(images)                           #   so T5 never loads beside it
    print(captioner.freed)

`data.captioner` names the model (a Hub id or a local folder); the `model_type` in its config.json names its
family. Processor and model load through transformers' Auto classes, never with trust_remote_code.

| family | e.g. | asked with | fp16 weights | licence |
|---|---|---|---|---|
| Florence-2 | florence-community/Florence-2-large (-base: 0.23 B) | task `<DETAILED_CAPTION>` | 1.6 GB | MIT |
| Qwen-VL | Qwen/Qwen3-VL-2B-Instruct | a chat turn: QWEN_PROMPT | 4.3 GB | Apache-2.0 |
| Qwen-VL | Qwen/Qwen2.5-VL-3B-Instruct | the same | 7.5 GB | Qwen research (non-commercial) |
| BLIP | Salesforce/blip-image-captioning-large | nothing (unconditional) | 0.9 GB | BSD-3-Clause |

The default is Florence-2-large in transformers' own format: two or three sentences of detail per image from a
tenth of a T4, weights published in fp16. (microsoft/Florence-2-large is the same model for its own remote code:
transformers' class would load it under the wrong weight names, so it is refused with the name to use.) Its
`<MORE_DETAILED_CAPTION>` writes a paragraph, past T5's default 77 tokens. Qwen-VL follows an instruction, so it
can be told to leave the style out, but it is 3-5x the weights, its processors need torchvision, and Qwen models,
trained in bf16, have been reported to overflow in fp16, a T4's only half precision (transformers issue 33294,
QwenLM/Qwen3 issue 826). BLIP stays for the runs whose config.json names it: one short COCO-style line each.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import memory
from ..base.errors import FluxnbError
from ..base.hub_errors import hub_errors
from ..config import DataConfig

MAX_SIDE = 1024  # pixels: larger images are shrunk first (Qwen-VL would otherwise see up to 16k tokens each)
QWEN_PROMPT = ("Describe this image in one sentence for a training caption: the subjects, objects, setting, colours "
               "and composition. Do not name the art style, the medium, the technique or the artist.")


class CaptionerError(FluxnbError):
    """The captioner named in the config cannot be used: the message says what to use instead."""


@dataclass(frozen=True)
class Family:
    """How one family of captioners is asked for a caption."""

    name: str
    model_types: tuple[str, ...]  # config.json's model_type values that belong to it
    prompt: str | None  # Florence: a task token; Qwen: the instruction of a chat turn; BLIP: none
    chat: bool  # the prompt goes through the processor's chat template, and the output repeats the prompt
    generation: dict[str, Any]
    needs: tuple[str, ...] = ()  # modules its processor imports besides transformers


FAMILIES = (
    Family("Florence-2", ("florence2",), "<DETAILED_CAPTION>", False,
           {"max_new_tokens": 120, "num_beams": 3, "no_repeat_ngram_size": 3}),
    Family("Qwen-VL", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), QWEN_PROMPT, True,
           {"max_new_tokens": 80, "do_sample": False}, needs=("torchvision",)),
    Family("BLIP", ("blip",), None, False, {"max_new_tokens": 40, "num_beams": 3, "repetition_penalty": 1.3}),
)
DEFAULT = DataConfig.captioner  # florence-community/Florence-2-large
REMOTE_CODE = {"microsoft/Florence-2-large": DEFAULT, "microsoft/Florence-2-base": "florence-community/Florence-2-base"}


def family_of(model_id: str) -> Family:
    """The family of `model_id`, from its config.json alone (a few kB), before any weights load."""
    from transformers import PretrainedConfig

    with hub_errors(model_id):
        config, _ = PretrainedConfig.get_config_dict(model_id)
    if "auto_map" in config:
        instead = REMOTE_CODE.get(model_id, f"a transformers-native copy (e.g. {DEFAULT})")
        raise CaptionerError(f"captioner {model_id} is made for its own remote code (auto_map in its config.json), "
                             f"which fluxnb never runs; set data.captioner to {instead}.")
    kind = config.get("model_type")
    for family in FAMILIES:
        if kind in family.model_types:
            missing = [m for m in family.needs if importlib.util.find_spec(m) is None]
            if missing:
                raise CaptionerError(f"{family.name} captioners ({model_id}) need {', '.join(missing)}, which is not "
                                     f"installed: `pip install {' '.join(missing)}` (the build that matches your "
                                     f"torch), or caption with {DEFAULT}.")
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise CaptionerError(f"captioner {model_id} is a {kind!r} model; fluxnb captions with {names}: set "
                         f"data.captioner to one of those, e.g. {DEFAULT}.")


@dataclass
class Captioner:
    family: Family
    processor: Any  # AutoProcessor: resizes and normalises the images, builds the prompt, decodes token ids
    model: Any  # AutoModelForImageTextToText, eval mode, on the device in the compute dtype
    device: torch.device
    dtype: torch.dtype
    freed: memory.Freed | None = field(default=None, repr=False)  # set when `loaded` gives the memory back

    def _inputs(self, images: list) -> Any:
        images = [_at_most(image, MAX_SIDE) for image in images]
        prompt = self.family.prompt
        if self.family.chat:
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            prompt = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        texts = None if prompt is None else [prompt] * len(images)
        return self.processor(images=images, text=texts, padding=texts is not None, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        inputs = self._inputs(images).to(self.device, self.dtype)  # casts only the floating tensors (pixels)
        with _one_thread(self.model):
            ids = self.model.generate(**inputs, **self.family.generation)  # (B, prompt + new) or (B, new)
        if self.family.chat:
            ids = ids[:, inputs["input_ids"].shape[1]:]  # left-padded prompts all end at the same column
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


def _at_most(image, side: int):
    if max(image.size) <= side:
        return image
    image = image.copy()
    image.thumbnail((side, side))
    return image


@contextlib.contextmanager
def _one_thread(model):
    """The tiny captioners are 32 wide: on the CPU, thread hand-offs cost more than their math (many times over on
    2 busy cores), as for the tiny FLUX (fluxnb.train.loop.cpu_threads). Real models keep every thread."""
    small = model.device.type == "cpu" and model.config.get_text_config().hidden_size <= 64
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_captioner(model_id: str, hw) -> Captioner:
    """The captioner in the run's compute dtype (fp16 on a T4, bf16 where the GPU has it, fp32 on the CPU)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = family_of(model_id)
    with hub_errors(model_id):
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=False)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=hw.dtype, trust_remote_code=False)
    if family.chat:
        processor.tokenizer.padding_side = "left"  # a batch's new tokens then start at one column
    return Captioner(family, processor, model.to(hw.device).eval(), hw.device, hw.dtype)


@contextlib.contextmanager
def loaded(model_id: str, hw) -> Iterator[Captioner]:
    """The captioner for one block; its weights are emptied on the way out, also when captioning fails, so that
    the text encoders that come next (T5 alone is 9.5 GB) never share the GPU with it."""
    captioner = load_captioner(model_id, hw)
    try:
        yield captioner
    finally:
        captioner.freed = memory.free(captioner.model)
