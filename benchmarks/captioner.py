"""Notebook 01's captioner on CUDA in fp16 inside a T4's 14.7 GiB, full size, random weights: GPU memory and seconds
per image at 512x768, for each captioner family fluxnb supports (fluxnb.data.captioner).

No checkpoint can be downloaded on the GPU machine; memory and time depend on the architecture alone. So this
builds each model from its checkpoint's config, with the real sizes written out below, random weights, in fp16 on
the GPU; saves it with a processor of the real class (image sizes, image-token counts, vocabulary size as the real
one; the words are fillers); then loads it through fluxnb.data.captioner's real path (AutoProcessor +
AutoModelForImageTextToText.from_pretrained, fp16) under torch.cuda.set_per_process_memory_fraction(14.7 GiB)
and captions a folder of 512x768 images with fluxnb.data.captions.caption_folder. Random weights rarely stop
early, so every caption runs to the family's max_new_tokens: the seconds are an upper bound. Captions are junk.

    python benchmarks/captioner.py --out /tmp/cap                                 # Florence-2-large (the default)
    python benchmarks/captioner.py --out /tmp/cap --family qwen3-vl-2b blip-large  # several, one after the other
    python benchmarks/captioner.py --out /tmp/cap --tiny                          # CPU, tiny sizes: checks the script

Qwen-VL's processors need torchvision (the script stops with that message where it is missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import string
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from fluxnb.base import memory
from fluxnb.config import DataConfig
from fluxnb.data.captioner import load_captioner
from fluxnb.data.captions import caption_folder, plan_captions
from fluxnb.run.hardware import detect
from fluxnb.tiny import captioner as tiny

T4_GIB = 14.7
# florence-community/Florence-2-large: DaViT (4 stages) at 768 px -> 577 image tokens, BART-large encoder-decoder.
FLORENCE_2_LARGE = {
    "image_size": 768, "vocab_size": 51289, "model_vocab_size": 51328,  # + "<image>", padded to a multiple of 64
    "text": {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
             "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
             "max_position_embeddings": 1024, "activation_function": "gelu", "scale_embedding": False},
    "vision": {"embed_dim": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64], "num_groups": [8, 16, 32, 64],
               "depths": [1, 1, 9, 1], "window_size": 12, "projection_dim": 1024, "max_position_embeddings": 50},
}
# florence-community/Florence-2-base: the same at smaller widths, BART-base.
FLORENCE_2_BASE = {
    **FLORENCE_2_LARGE,
    "text": {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 12,
             "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
             "max_position_embeddings": 1024, "activation_function": "gelu", "scale_embedding": False},
    "vision": {"embed_dim": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32],
               "depths": [1, 1, 9, 1], "window_size": 12, "projection_dim": 768, "max_position_embeddings": 50},
}
# Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px + a BERT-base text decoder (BlipTextConfig's defaults).
BLIP_LARGE = {"image_size": 384, "vocab_size": 30524, "text": {},
              "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "patch_size": 16}}
# Qwen's special tokens, ids 151643 on (the same in Qwen2.5-VL and Qwen3-VL).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL = 151643
# Qwen/Qwen3-VL-2B-Instruct: a 24-block ViT (16 px patches, 2x2 merged: 32 px per token) + a 28-layer decoder.
QWEN3_VL_2B = {
    "model_type": "qwen3_vl", "patch": 16, "mean": [0.5] * 3, "std": [0.5] * 3,
    "pixels": {"shortest_edge": 65536, "longest_edge": 16777216},
    "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_parameters": {
                 "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                 "mrope_interleaved": True}},
    "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
               "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
               "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"},
    "tie_word_embeddings": True,
}
# Qwen/Qwen2.5-VL-3B-Instruct: a 32-block windowed ViT (14 px patches, 2x2 merged: 28 px per token) + 36 layers.
QWEN2_5_VL_3B = {
    "model_type": "qwen2_5_vl", "patch": 14, "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "pixels": {"shortest_edge": 3136, "longest_edge": 12845056},
    "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_parameters": {
                 "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"},
    "tie_word_embeddings": True,
}
FULL = {"florence-2-large": ("florence2", FLORENCE_2_LARGE), "florence-2-base": ("florence2", FLORENCE_2_BASE),
        "qwen3-vl-2b": ("qwen", QWEN3_VL_2B), "qwen2.5-vl-3b": ("qwen", QWEN2_5_VL_3B),
        "blip-large": ("blip", BLIP_LARGE)}


def tiny_qwen(sizes: dict) -> dict:
    """The same architecture at tiny widths (the --tiny check of the Qwen builder)."""
    mrope = [2, 3, 3] if sizes["model_type"] == "qwen3_vl" else [2, 2, 4]
    text = {**sizes["text"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "rope_parameters": {**sizes["text"]["rope_parameters"], "mrope_section": mrope}}
    vision = {**sizes["vision"], "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 32, "num_position_embeddings": 64, "deepstack_visual_indexes": [0],
              "fullatt_block_indexes": [1], "window_size": 2 * sizes["patch"] * 2}
    vision = {k: v for k, v in vision.items() if k in sizes["vision"]}
    return {**sizes, "text": text, "vision": vision, "pixels": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}}


def qwen_parts(sizes: dict):
    """(config, processor) of a Qwen-VL captioner: Qwen's special tokens at their real ids, fillers between."""
    import transformers
    from transformers import AutoConfig, Qwen2Tokenizer, Qwen2VLImageProcessor

    vocab = sorted(set("ĠĊ.,:'" + string.ascii_letters + string.digits))  # Ċ: byte-level BPE's newline
    vocab += [f"<w{i}>" for i in range(len(vocab), QWEN_FIRST_SPECIAL)]
    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token=None, bos_token=None,
                               eos_token=None, pad_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})  # in id order, as in the real one
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655, "Qwen's special ids moved"
    config = AutoConfig.for_model(sizes["model_type"], text_config=sizes["text"], vision_config=sizes["vision"],
                                  tie_word_embeddings=sizes["tie_word_embeddings"])
    images = Qwen2VLImageProcessor(patch_size=sizes["patch"], merge_size=2, temporal_patch_size=2,
                                   size=sizes["pixels"], image_mean=sizes["mean"], image_std=sizes["std"])
    qwen3 = sizes["model_type"] == "qwen3_vl"
    processor = getattr(transformers, "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor")
    video = getattr(transformers, "Qwen3VLVideoProcessor" if qwen3 else "Qwen2VLVideoProcessor")()
    return config, processor(image_processor=images, tokenizer=tokenizer, video_processor=video, chat_template=CHAT)


# Qwen's chat layout for one user turn with an image (the real templates add tool and video branches).
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(name: str, out: Path, *, small: bool, device: str) -> Path:
    """The captioner `name` with random weights, saved in fp16 (fp32 when small, on the CPU) with its processor."""
    import importlib.util

    from transformers import AutoModelForImageTextToText

    kind, sizes = FULL[name]
    if kind == "qwen" and importlib.util.find_spec("torchvision") is None:
        raise SystemExit(f"{name}: Qwen-VL's processors need torchvision, which is not installed here.")
    if small:
        sizes = tiny_qwen(sizes) if kind == "qwen" else tiny.TINY[kind]
    config, processor = qwen_parts(sizes) if kind == "qwen" else tiny.parts(kind, sizes)
    torch.manual_seed(0)
    with torch.device(device):  # random init where it runs: a 3 B model in seconds on the GPU
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32 if small else torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def images_folder(out: Path, n: int) -> Path:
    """n uncaptioned 512x768 images (noise), the size of the blog's training images."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (768, 512, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def measure(name: str, args, hw) -> dict:
    """Build, then load and caption through fluxnb's real path; the numbers of one captioner."""
    root = args.out / name
    start = time.perf_counter()
    model_dir = build(name, root / "model", small=args.tiny, device=str(hw.device))
    built = time.perf_counter() - start
    folder = images_folder(root, args.images)
    plan = plan_captions(folder, DataConfig(dataset=str(folder)), overwrite=True)
    with memory.measure("captioner loaded") as load:
        captioner = load_captioner(str(model_dir), hw)
    params = sum(p.numel() for p in captioner.model.parameters())
    with memory.measure("captioning") as run:
        caption_folder(plan, captioner, trigger="mucha style", batch_size=args.batch_size, progress=False)
    freed = memory.free(captioner.model)  # as fluxnb.data.captioner.loaded does on its way out
    return {"captioner": name, "family": captioner.family.name, "params": params, "dtype": str(hw.dtype),
            "image": "512x768", "images": args.images, "batch_size": args.batch_size,
            "max_new_tokens": captioner.family.generation["max_new_tokens"], "build_s": round(built, 1),
            "load": load.stats, "caption": run.stats, "s_per_image": round(run.stats["seconds"] / args.images, 4),
            "freed": str(freed), "first_caption": plan.rows[0]["text"][:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", nargs="+", default=["florence-2-large"], choices=sorted(FULL))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--commit", default="", help="the git commit of the code that runs (recorded)")
    parser.add_argument("--results", type=Path, default=None, help="also write the report here (JSON)")
    args = parser.parse_args()
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
    hw = detect("tiny") if args.tiny else detect("real", "fp16")
    if hw.device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(T4_GIB * 2**30 / total)
    import transformers

    report = {"commit": args.commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "device": hw.describe(), "cap_gib": T4_GIB if hw.device.type == "cuda" else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "captioners": []}
    for name in args.family:  # the report rewritten after each family: a timeout keeps the ones done
        report["captioners"].append(measure(name, args, hw))
        if args.results:
            args.results.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
