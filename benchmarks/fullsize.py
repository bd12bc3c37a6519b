"""A full-size FLUX.1-dev pipeline with random weights, in FLUX.1-dev's folder layout, for time and memory on the
GPU machine; plus a generated image + caption dataset at the blog's size.

FLUX.1-dev itself cannot be downloaded there. Speed and memory depend on the components' shapes only, so this
builds each with FLUX.1-dev's exact config on the GPU in seconds (`init_empty_weights`, `to_empty`, fill with
small fan-in scaled random values), saves it in bf16 safetensors sharded like the real repo, and everything else
(8-bit T5, VAE, NF4 transformer, pipeline, merge) loads it through the real `from_pretrained` paths.

    out/model/   model_index.json, transformer/ (11.9 B, 3 shards), text_encoder_2/ (T5-v1.1-XXL, 4.8 B, 2 shards),
                 text_encoder/ (CLIP-L), vae/ (16 channels), scheduler/, tokenizer/, tokenizer_2/
    out/dataset/ 24 drawn images (512x768 and other aspect ratios) + metadata.jsonl captions
    out/pairs/   (build_pipeline(pairs=True)) the same 24 as FLUX.1-Kontext-dev targets, control/ their inputs

The tokenizers are the tiny profile's (fluxnb.tiny.flux: built locally, a few hundred pieces); the encoders keep the
real vocabulary sizes (CLIP 49,408, T5 32,128), so their embedding tables are full size. Image quality means
nothing; time and memory are real.

    python benchmarks/fullsize.py --out /tmp/flux-full                       # -> model/ and dataset/
    python benchmarks/fullsize.py --out /tmp/flux-random --transformer-only  # -> transformer/ only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# text_encoder_2/config.json (google/t5-v1_1-xxl, encoder only)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
# text_encoder/config.json (openai/clip-vit-large-patch14, text tower)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# vae/config.json
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FULL = {"transformer": FLUX_DEV_TRANSFORMER, "t5": T5_XXL, "clip": CLIP_L, "vae": FLUX_VAE}
# The real repo's shards: transformer 3 x <= 10 GB, text_encoder_2 2 x <= 5 GB.
SHARDS = {"transformer": "10GB", "text_encoder_2": "5GB"}

MODEL_INDEX = {
    "_class_name": "FluxPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# (width, height) of the dataset's images: mostly the blog's 512x768, then other aspect ratios and sizes.
SIZES = [(512, 768)] * 14 + [(768, 512)] * 3 + [(640, 640)] * 3 + [(1024, 1536), (832, 1216), (448, 672), (768, 1024)]


def _fill_(model: torch.nn.Module, seed: int, device: str) -> int:
    """Random weights in place: biases 0, norm scales 1, matrices N(0, 1/fan_in) (activations stay finite)."""
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5, generator=gen)
    return sum(p.numel() for p in model.parameters())


def _empty(cls, config, device: str, dtype: torch.dtype):
    """`cls(config)` with no memory until `to_empty`: a 12 B model appears in seconds, not minutes of CPU init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    model = model.to(dtype).to_empty(device=device)
    if hasattr(model, "tie_weights"):  # to_empty made new tensors: T5's shared table and embed_tokens are one
        model.tie_weights()
    return model


def transformer_inputs(width: int, height: int, text: int, *, config: dict = FLUX_DEV_TRANSFORMER,
                       device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> dict:
    """One sample's FluxTransformer2DModel(**inputs) at width x height with `text` tokens, as zeros (on "meta":
    shapes alone, what counting needs: benchmarks/t4_estimate.py, benchmarks/step_flops.py)."""
    n = (width // 16) * (height // 16)  # packed 2x2 latent patches
    like = dict(device=device, dtype=dtype)
    return dict(hidden_states=torch.zeros(1, n, config["in_channels"], **like),
                encoder_hidden_states=torch.zeros(1, text, config["joint_attention_dim"], **like),
                pooled_projections=torch.zeros(1, config["pooled_projection_dim"], **like),
                timestep=torch.zeros(1, device=device), guidance=torch.zeros(1, device=device),
                img_ids=torch.zeros(n, 3, device=device), txt_ids=torch.zeros(text, 3, device=device))


def _save(name: str, model, folder: Path, started: float) -> None:
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / name, max_shard_size=SHARDS.get(name, "10GB"))
    print(f"  {name}: {n / 1e9:.3f} B params, {time.perf_counter() - started:.0f} s", flush=True)


def build_model(folder: Path, dims: dict = FULL, *, seed: int = 0, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the FluxPipeline folder (model_index.json + every component) unless it is complete already."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxnb.tiny.flux import (  # the tiny profile's local tokenizers
        _clip_tokenizer,
        _t5_tokenizer,
    )

    if (folder / "model_index.json").is_file():
        return folder
    started = time.perf_counter()
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tokenizer_2.save_pretrained(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(folder / "scheduler")
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    # CLIP has a position_ids buffer that to_empty would leave undefined: it is small, so build it normally.
    clip = CLIPTextModel(CLIPTextConfig(**dims["clip"], **special)).to(device, dtype)
    _fill_(clip, seed, device)
    _save("text_encoder", clip, folder, started)
    t5 = _empty(T5EncoderModel, T5Config(**dims["t5"], pad_token_id=tokenizer_2.pad_token_id, decoder_start_token_id=0,
                                         eos_token_id=tokenizer_2.eos_token_id), device, dtype)
    _fill_(t5, seed + 1, device)
    _save("text_encoder_2", t5, folder, started)
    del t5
    vae = _empty(AutoencoderKL, dims["vae"], device, dtype)
    _fill_(vae, seed + 2, device)
    _save("vae", vae, folder, started)
    transformer = _empty(FluxTransformer2DModel, dims["transformer"], device, dtype)
    _fill_(transformer, seed + 3, device)
    _save("transformer", transformer, folder, started)
    del transformer
    if device == "cuda":
        torch.cuda.empty_cache()
    from diffusers import __version__

    # Written last: its presence marks a complete build.
    (folder / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "_diffusers_version": __version__},
                                                        indent=2) + "\n")
    print(f"built random FLUX.1-dev pipeline -> {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def build_dataset(folder: Path, sizes: list[tuple[int, int]] = SIZES, pairs: bool = False) -> Path:
    """Drawn images (the tiny profile's style and subjects, at full size) in datasets' imagefolder layout.
    pairs: FLUX.1-Kontext-dev's paired layout instead, as fluxnb.tiny.pairs makes it at tiny size: each subject
    drawn plain at its target's size in control/, an instruction as its caption."""
    from fluxnb.tiny.dataset import SUBJECTS, TRIGGER_WORD, draw as _draw
    from fluxnb.tiny.pairs import CONTROL_FOLDER, plain

    if (folder / "metadata.jsonl").is_file():
        return folder
    (folder / CONTROL_FOLDER if pairs else folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, size in enumerate(sizes):
        name, text, shapes = SUBJECTS[i % len(SUBJECTS)]
        file_name = f"{i:02d}_{name}_{size[0]}x{size[1]}.png"
        _draw(shapes, size).save(folder / file_name, format="PNG")
        if pairs:
            plain(shapes, size).save(folder / CONTROL_FOLDER / file_name, format="PNG")
        caption = (f"turn the {name} into {TRIGGER_WORD} style" if pairs
                   else f"{text}{', seen up close' if i >= len(SUBJECTS) else ''}, {TRIGGER_WORD} style")
        rows.append(json.dumps({"file_name": file_name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def build_pipeline(out: Path, *, seed: int = 0, device: str = "cuda", pairs: bool = False) -> Path:
    """out/model (the pipeline) and out/dataset (pairs: and out/pairs); returns out. FLUX.1-Kontext-dev has
    FLUX.1-dev's components and sizes: the one model serves both."""
    build_model(out / "model", seed=seed, device=device)
    build_dataset(out / "dataset")
    if pairs:
        build_dataset(out / "pairs", pairs=True)
    return out


def build(out: Path, *, seed: int = 0, device: str = "cuda") -> Path:
    """The transformer alone, out/transformer (what the training-step benchmarks load); returns that folder."""
    from diffusers import FluxTransformer2DModel

    if not (out / "transformer" / "config.json").is_file():
        transformer = _empty(FluxTransformer2DModel, FLUX_DEV_TRANSFORMER, device, torch.bfloat16)
        _fill_(transformer, seed, device)
        _save("transformer", transformer, out, time.perf_counter())
    return out / "transformer"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flux-full"))
    parser.add_argument("--transformer-only", action="store_true", help="only out/transformer (training benchmarks)")
    args = parser.parse_args()
    (build if args.transformer_only else build_pipeline)(args.out)
