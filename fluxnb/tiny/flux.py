"""Tiny profile: an offline, random-weight stand-in for black-forest-labs/FLUX.1-dev.

`build_tiny` writes a FluxPipeline folder with the same component classes and layout as
FLUX.1-dev (so the rest of fluxnb loads it through the normal `from_pretrained` paths)
plus a small imagefolder dataset in one consistent drawn style (fluxnb.tiny.dataset).  Everything is seeded and
written with fixed encoder settings, so two builds are byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..base.files import build_into
from .dataset import VALIDATION_PROMPTS, captions, save_dataset

# Bump whenever the output of build_tiny changes, so ensure_tiny rebuilds stale caches.
TINY_VERSION = 2  # 2: the pooled-text projection carries the prompt (POOLED_TEXT_GAIN)
STAMP_NAME = "tiny_stamp.json"
PROMPTS_NAME = "validation_prompts.json"
# With default random weights the prompt barely reaches the image: every text path goes through a LayerNorm or a
# small AdaLN modulation, so two validation prompts at one seed differed by 0.3-0.7% of the pixel range (another
# seed: 14%). FLUX.1-dev's pooled CLIP vector steers every block's modulation; scaling the output weights of that
# projection (time_text_embed.text_embedder.linear_2) by this gain makes prompts differ by several percent
# (tests/test_tiny.py checks it), so base-vs-LoRA grids show one image per prompt, not four copies.
POOLED_TEXT_GAIN = 16.0

# Extra words so that ordinary prompts mostly tokenize to whole words, not characters.
_COMMON_WORDS = """the a an of in on at with and or under above near by from to is are this that
photo painting illustration drawing poster art image picture portrait landscape style city street
sky night day red blue green yellow black white orange purple pink brown gold silver big small old
young man woman person people dog cat bird car road river lake forest field garden flower tree sun
moon star cloud rain snow window door room table chair light dark bright soft warm cold beautiful
simple detailed flat bold vintage modern hat sitting standing walking close up view background""".split()


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    model: Path  # root/"model": a FluxPipeline folder
    dataset: Path  # root/"dataset": datasets imagefolder layout (images + metadata.jsonl)
    validation_prompts: list[str]


def _words() -> list[str]:
    words = {w.strip(",.").lower() for s in captions() + VALIDATION_PROMPTS for w in s.split()}
    return sorted(words.union(_COMMON_WORDS) - {""})


def _chars() -> list[str]:
    return sorted(string.ascii_letters + string.digits + ",.!?'\"-:;()&/")


def _t5_tokenizer():
    """T5-style Unigram: pad 0, eos 1, unk 2; whole words score above char fallbacks."""
    from transformers import (
        T5TokenizerFast,  # an alias of T5Tokenizer in transformers 5
    )

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    vocab += [("▁" + w, -5.0) for w in _words()]
    for piece in _chars() + ["▁" + c for c in _chars()]:
        # Every ASCII char, word-initial or not, so ASCII text never hits <unk>; skip duplicates
        # (e.g. "▁a" is already a word) because a repeated piece would get two ids.
        if piece not in {p for p, _ in vocab}:
            vocab.append((piece, -10.0))
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet, in the canonical byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return [chr(c) for c in bs] + [chr(256 + i) for i in range(len(extra))]


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair, ties by pair) until every word is one symbol.

    Merges learnt this way re-tokenize each training word into a single token, which naive
    per-word merge chains do not (another word's merge can fire in the middle first).
    """
    segs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while counts := Counter(pair for seg in segs for pair in zip(seg, seg[1:])):
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((a, b))
        for seg in segs:
            i = 0
            while i < len(seg) - 1:
                if seg[i] == a and seg[i + 1] == b:
                    seg[i : i + 2] = [a + b]
                i += 1
    return merges


def _clip_tokenizer():
    """Byte-level BPE like CLIP: 512 base symbols, then learnt merges, specials last."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = _bpe_merges(_words())
    for piece in [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_encoders(tokenizer, tokenizer_2, seed: int):
    """Tiny CLIP-L / T5-v1.1 look-alikes whose vocab and special ids come from the tokenizers."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)  # each component gets its own seed, so its bytes don't depend on the others
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id))
    return clip, t5


def _vae(seed: int):
    """FLUX.1-dev's VAE shape (16 latent channels, 4 levels -> scale factor 8) with tiny widths."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        norm_num_groups=8, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)


def _transformer(vae, clip, t5, seed: int):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=vae.config.latent_channels * 4,  # latents are packed as 2x2 patches
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=True)  # FLUX.1-dev is guidance-distilled
    with torch.no_grad():
        model.time_text_embed.text_embedder.linear_2.weight.mul_(POOLED_TEXT_GAIN)
    return model


def _save_pipeline(model_dir: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder, text_encoder_2 = _text_encoders(tokenizer, tokenizer_2, seed)
    vae = _vae(seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=_transformer(vae, text_encoder, text_encoder_2, seed + 3))
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 made T5TokenizerFast an alias of T5Tokenizer, so diffusers records the latter;
    # write FLUX.1-dev's name so loading goes through exactly the path the real checkpoint takes.
    index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    _write_json(model_dir / "model_index.json", index)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _assets(root: Path) -> TinyAssets:
    return TinyAssets(root=root, model=root / "model", dataset=root / "dataset",
                      validation_prompts=list(VALIDATION_PROMPTS))


def build_tiny(out: str | Path, *, seed: int = 0) -> TinyAssets:
    """Write (overwriting) the tiny model and dataset under `out`; same seed -> same bytes."""
    assets = _assets(Path(out).expanduser().resolve())
    for stale in (assets.model, assets.dataset, assets.root / PROMPTS_NAME, assets.root / STAMP_NAME):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    assets.root.mkdir(parents=True, exist_ok=True)
    _save_pipeline(assets.model, seed)
    save_dataset(assets.dataset)
    # Not inside dataset/: datasets infers splits from file names, and a "validation_*" file there
    # turns the folder into a lone, empty "validation" split (no "train" split at all).
    _write_json(assets.root / PROMPTS_NAME, VALIDATION_PROMPTS)
    # Written last: its presence marks a complete build for ensure_tiny.
    _write_json(assets.root / STAMP_NAME, {"seed": seed, "tiny_version": TINY_VERSION})
    return assets


def _is_current(root: Path) -> bool:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == {"seed": 0, "tiny_version": TINY_VERSION}


def tiny_root() -> Path:
    """Where the tiny assets live: $FLUXNB_TINY_DIR, else ~/.cache/fluxnb/tiny (nothing is built by asking)."""
    return Path(os.environ.get("FLUXNB_TINY_DIR") or Path.home() / ".cache" / "fluxnb" / "tiny").expanduser().resolve()


def ensure_tiny(root: str | Path | None = None) -> TinyAssets:
    """Return the cached tiny assets, building them first if missing or from an older TINY_VERSION."""
    root = tiny_root() if root is None else Path(root).expanduser().resolve()
    if _is_current(root):
        return _assets(root)
    if root.exists():  # outdated or partial: rebuild in place; build_tiny only replaces its own files
        return build_tiny(root)
    build_into(root, build_tiny, _is_current)
    return _assets(root)
