"""The captioner (BLIP-large) on CUDA in fp16 inside a T4's 14.7 GiB, with random full-size weights.

Salesforce/blip-image-captioning-large cannot be downloaded on the GPU machine; its architecture
(fluxnb.tiny.captioner.full_size_config) is all that memory and time depend on. This builds it with random weights,
saves it with a BERT-sized tokenizer (30524 ids, BLIP's special ids), loads it through fluxnb.data.captions'
real path (BlipProcessor / BlipForConditionalGeneration.from_pretrained, fp16) under
torch.cuda.set_per_process_memory_fraction(14.7 GiB), and captions a batch of images. Captions are random words.

    python benchmarks/captioner_gpu.py --out /tmp/blip-random            # GPU, full size, fp16, T4 cap
    python benchmarks/captioner_gpu.py --out /tmp/blip-tiny --tiny       # CPU, the tiny config (a dry run)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from fluxnb.base import memory
from fluxnb.data.captions import caption_folder, load_captioner, plan_captions
from fluxnb.config import DataConfig
from fluxnb.run.hardware import detect
from fluxnb.tiny.captioner import IMAGE_SIZE, build_tiny_captioner, full_size_config

T4_GIB = 14.7


def bert_sized_tokenizer():
    """BERT-base-uncased's ids for the specials BLIP uses ([PAD] 0, [SEP] 102, [DEC] 30522), filler words between."""
    from transformers import BertTokenizerFast

    tokens = [f"w{i}" for i in range(30524)]
    for i, t in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]",
                 30523: "[ENC]"}.items():
        tokens[i] = t
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]", model_max_length=512)


def build_full_size(out: Path) -> Path:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(full_size_config()).to(torch.float16)  # random init, as transformers does
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}),
                  tokenizer=bert_sized_tokenizer()).save_pretrained(out)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny config on the CPU (checks the script)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    hw = detect("tiny") if args.tiny else detect("real", "fp16")
    if hw.device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(T4_GIB * 2**30 / total)
    start = time.perf_counter()
    model_dir = build_tiny_captioner(args.out / "model") if args.tiny else build_full_size(args.out / "model")
    built = time.perf_counter() - start
    with memory.measure("captioner loaded") as loaded:
        captioner = load_captioner(str(model_dir), hw)
    params = sum(p.numel() for p in captioner.model.parameters())
    plan = plan_captions(images_folder(args.out, args.images), DataConfig(dataset=str(args.out)))
    with memory.measure("captioning") as run:
        result = caption_folder(plan, captioner, trigger="mucha style", batch_size=args.batch_size, progress=False)
    freed = memory.free(captioner.model)
    report = {"device": hw.describe(), "dtype": str(captioner.model.dtype), "params": params,
              "image_side": IMAGE_SIZE if args.tiny else 384, "cap_gib": T4_GIB, "build_s": round(built, 1),
              "load": loaded.stats, "caption": run.stats, "images": args.images, "batch_size": args.batch_size,
              "s_per_image": run.stats["seconds"] / args.images, "freed_gib": freed,
              "first_captions": [r["text"] for r in plan.rows[:2]], "torch": torch.__version__}
    print(json.dumps(report, indent=1, default=str))
    print(result)


if __name__ == "__main__":
    main()
