"""Tiny profile's captioner: an offline, random-weight stand-in for Salesforce/blip-image-captioning-large.

    path = ensure_tiny_captioner()        # a folder that BlipForConditionalGeneration.from_pretrained loads

The same classes as the real captioner (BlipForConditionalGeneration, BlipProcessor = BlipImageProcessor +
BertTokenizerFast), tiny widths, random seeded weights, a word-level WordPiece vocabulary built here: so
fluxnb.data.captions loads and runs it through exactly the real code path. Its captions are random words.
`full_size_config()` is the real checkpoint's architecture (for the GPU memory benchmark: random weights).
Kept apart from fluxnb.tiny.flux so that the tiny FLUX and the tiny captioner can change independently.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..base.files import build_into

TINY_CAPTIONER_VERSION = 1
STAMP_NAME = "tiny_captioner_stamp.json"
IMAGE_SIZE = 32  # the tiny vision tower's input side; BLIP-large's is 384
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, BERT's special tokens
_WORDS = """a an the of in on with and picture painting drawing of poster small big round tall red blue green
yellow cream teal ochre dark bright sun moon hill hills mountain flower tree house boat bird fish cup cat
sea sky water leaf star cloud frame border style flat simple bold""".split()


def _vocab() -> list[str]:
    # BLIP starts decoding with "[DEC]" (its bos token, the last id) and stops at "[SEP]".
    return _SPECIALS + sorted(set(_WORDS)) + ["[DEC]"]


def _tokenizer():
    from transformers import (
        BertTokenizerFast,  # an alias of BertTokenizer in transformers 5
    )

    vocab = {token: i for i, token in enumerate(_vocab())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512, bos_token="[DEC]")


def tiny_config():
    from transformers import BlipConfig

    vocab = _vocab()
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 32, "max_position_embeddings": 64,
            "bos_token_id": len(vocab) - 1, "eos_token_id": 3, "sep_token_id": 3, "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 32, "image_size": IMAGE_SIZE, "patch_size": 8}
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)


def full_size_config():
    """Salesforce/blip-image-captioning-large's architecture: ViT-L/16 at 384 px + BERT-base text decoder."""
    from transformers import BlipConfig

    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 16}
    return BlipConfig(text_config={}, vision_config=vision)  # the text side is BlipTextConfig's default (30524)


def build_tiny_captioner(out: str | Path, *, seed: int = 0) -> Path:
    """Write (overwriting) the tiny BLIP captioner into `out`; same seed -> same weights."""
    import torch
    from transformers import (
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out).expanduser().resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(tiny_config())
    model.save_pretrained(out, safe_serialization=True)
    images = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=images, tokenizer=_tokenizer()).save_pretrained(out)
    (out / STAMP_NAME).write_text(json.dumps({"seed": seed, "version": TINY_CAPTIONER_VERSION}) + "\n")
    return out


def _is_current(root: Path) -> bool:
    try:
        return json.loads((root / STAMP_NAME).read_text()) == {"seed": 0, "version": TINY_CAPTIONER_VERSION}
    except (OSError, ValueError):
        return False


def ensure_tiny_captioner(root: str | Path | None = None) -> Path:
    """The cached tiny captioner folder, built first if missing or stale (built aside, renamed into place)."""
    if root is None:
        tiny = os.environ.get("FLUXNB_TINY_DIR") or Path.home() / ".cache" / "fluxnb" / "tiny"
        root = Path(tiny).expanduser().parent / "tiny-captioner"
    root = Path(root).expanduser().resolve()
    if _is_current(root):
        return root
    shutil.rmtree(root, ignore_errors=True)  # outdated or partial
    build_into(root, build_tiny_captioner, _is_current)
    return root


def uncaptioned_copy(dataset: str | Path, out: str | Path) -> Path:
    """A copy of an imagefolder dataset's images without metadata.jsonl: something to caption (CI, notebook 01)."""
    dataset, out = Path(dataset), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for image in sorted(dataset.glob("*.png")):
        shutil.copyfile(image, out / image.name)
    return out
