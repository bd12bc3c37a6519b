"""Tiny profile's captioner: an offline, random-weight stand-in for florence-community/Florence-2-large (and one
for BLIP, the family older runs name).

    path = ensure_tiny_captioner()                  # a folder that AutoModelForImageTextToText.from_pretrained loads
    path = ensure_tiny_captioner(family="blip")

The same classes as the real captioners (Florence2ForConditionalGeneration + Florence2Processor = a CLIP image
processor + BART's byte-level BPE tokenizer; BlipForConditionalGeneration + BlipProcessor), tiny widths, random
seeded weights, vocabularies built here from a few words: so fluxnb.data.captioner loads and runs them through
exactly the real code path. Their captions are random words. `parts(family, sizes)` builds any size: the benchmark
(benchmarks/captioner.py) passes the real checkpoints' sizes. Kept apart from fluxnb.tiny.flux so that the tiny
FLUX and the tiny captioners can change independently.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

from ..base.files import build_into

TINY_CAPTIONER_VERSION = 2
STAMP_NAME = "tiny_captioner_stamp.json"
FAMILIES = ("florence2", "blip")
_WORDS = """a an the of in on with and picture painting drawing of poster small big round tall red blue green
yellow cream teal ochre dark bright sun moon hill hills mountain flower tree house boat bird fish cup cat
sea sky water leaf star cloud frame border style flat simple bold""".split()
# Widths small enough to build in a second; the benchmark gives the real ones. vocab_size None: the words alone.
TINY = {
    "florence2": {"image_size": 64, "vocab_size": None,  # 64 px / 32 (the DaViT strides) -> 2 x 2 + 1 image tokens
                  "text": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
                           "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                           "max_position_embeddings": 128},
                  "vision": {"embed_dim": [8, 16, 32, 32], "num_heads": [1, 2, 2, 2], "num_groups": [1, 2, 2, 2],
                             "depths": [1, 1, 1, 1], "window_size": 2, "projection_dim": 32,
                             "max_position_embeddings": 8}},
    "blip": {"image_size": 32, "vocab_size": None,
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "projection_dim": 32, "max_position_embeddings": 64},
             "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "projection_dim": 32, "patch_size": 8},
             "projection_dim": 32, "image_text_hidden_size": 32},
}


def _fillers(vocab: list[str], size: int | None) -> list[str]:
    """Pad a vocabulary to a real checkpoint's size with tokens no text encodes to (decodable, never produced)."""
    return [f"<w{i}>" for i in range(len(vocab), size or 0)]


def _bart_tokenizer(size: int | None):
    """BART's byte-level BPE (Florence-2's tokenizer class): BART's special tokens, the letters every prompt splits
    into, one merge chain per word; then `<image>` (Florence's image token) after everything, as in the real one."""
    from transformers import BartTokenizer

    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *sorted(set("Ġ.,'" + string.ascii_letters + string.digits))]
    merges = []
    for word in sorted(set(_WORDS)):
        piece = "Ġ"
        for letter in word:
            merges.append((piece, letter))
            piece += letter
            vocab += [] if piece in vocab else [piece]
    vocab += _fillers(vocab, size)
    return BartTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(dict.fromkeys(merges)),
                         extra_special_tokens={"image_token": "<image>"}, model_max_length=1024)


def _florence2(sizes: dict):
    from transformers import CLIPImageProcessor, Florence2Config, Florence2Processor

    tokenizer = _bart_tokenizer(sizes["vocab_size"])
    side = sizes["image_size"]
    text = {"model_type": "bart", "vocab_size": sizes.get("model_vocab_size") or len(tokenizer), "bos_token_id": 0,
            "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2, "forced_bos_token_id": 0,
            "forced_eos_token_id": 2, **sizes["text"]}
    config = Florence2Config(text_config=text, vision_config=sizes["vision"], image_token_id=tokenizer.image_token_id)
    images = CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False,
                                crop_size={"height": side, "width": side}, image_mean=[0.485, 0.456, 0.406],
                                image_std=[0.229, 0.224, 0.225], image_seq_length=(side // 32) ** 2 + 1)
    return config, Florence2Processor(image_processor=images, tokenizer=tokenizer)


def _blip(sizes: dict):
    """BLIP starts decoding with "[DEC]" (its bos token, the last id) and stops at "[SEP]" (id 3)."""
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(_WORDS))]
    vocab += _fillers(vocab, sizes["vocab_size"] and sizes["vocab_size"] - 1) + ["[DEC]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512,
                              bos_token="[DEC]")
    text = {"vocab_size": len(vocab), "bos_token_id": len(vocab) - 1, "eos_token_id": 3, "sep_token_id": 3,
            "pad_token_id": 0, **sizes["text"]}
    vision = {"image_size": sizes["image_size"], **sizes["vision"]}
    rest = {k: v for k, v in sizes.items() if k not in ("image_size", "vocab_size", "text", "vision")}
    config = BlipConfig(text_config=text, vision_config=vision, **rest)
    images = BlipImageProcessor(size={"height": sizes["image_size"], "width": sizes["image_size"]})
    return config, BlipProcessor(image_processor=images, tokenizer=tokenizer)


def parts(family: str, sizes: dict | None = None):
    """(model config, processor) of a captioner of `family` at `sizes` (default: tiny)."""
    return {"florence2": _florence2, "blip": _blip}[family](sizes or TINY[family])


def build_tiny_captioner(out: str | Path, *, family: str = "florence2", seed: int = 0) -> Path:
    """Write (overwriting) the tiny captioner of `family` into `out`; same seed -> same weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out).expanduser().resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config, processor = parts(family)
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / STAMP_NAME).write_text(json.dumps(_stamp(family, seed)) + "\n")
    return out


def _stamp(family: str, seed: int = 0) -> dict:
    return {"family": family, "seed": seed, "version": TINY_CAPTIONER_VERSION}


def _is_current(root: Path, family: str) -> bool:
    try:
        return json.loads((root / STAMP_NAME).read_text()) == _stamp(family)
    except (OSError, ValueError):
        return False


def ensure_tiny_captioner(root: str | Path | None = None, *, family: str = "florence2") -> Path:
    """The cached tiny captioner folder, built first if missing or stale (built aside, renamed into place)."""
    if root is None:
        tiny = os.environ.get("FLUXNB_TINY_DIR") or Path.home() / ".cache" / "fluxnb" / "tiny"
        root = Path(tiny).expanduser().parent / f"tiny-captioner-{family}"
    root = Path(root).expanduser().resolve()
    if _is_current(root, family):
        return root
    shutil.rmtree(root, ignore_errors=True)  # outdated or partial
    build_into(root, lambda out: build_tiny_captioner(out, family=family), lambda r: _is_current(r, family))
    return root


def uncaptioned_copy(dataset: str | Path, out: str | Path) -> Path:
    """A copy of an imagefolder dataset's images without metadata.jsonl: something to caption (CI, notebook 01)."""
    dataset, out = Path(dataset), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for image in sorted(dataset.glob("*.png")):
        shutil.copyfile(image, out / image.name)
    return out
