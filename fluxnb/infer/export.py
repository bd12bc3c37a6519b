"""Export the trained LoRA for the tools most people run: ComfyUI, Forge and kohya's sd-scripts.

Training saves the LoRA in diffusers' format: keys named after diffusers' modules
(`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), scale alpha / r kept in the file's metadata.
Those tools expect kohya's format with Black Forest Labs' (BFL) module names instead:

    lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight   (R, in)     A
    lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight     (out, R)    B
    lora_unet_double_blocks_0_img_attn_qkv.alpha              ()          delta W = alpha / R * B @ A

BFL fuses q, k and v into ONE Linear (img_attn_qkv; in single blocks linear1 = q|k|v|mlp), so three rank-r LoRAs
become one rank-3r LoRA: A stacked row-wise, B block-diagonal (each part's B touches only its own rows and
columns), alpha = 3 * alpha so that alpha / R stays alpha / r. A missing part (mlp in linear1) gets a zero block:
diffusers' reader (`_convert_kohya_flux_lora_to_diffusers`) then sees the block-diagonal layout and splits it
back into the exact rank-r q, k, v LoRAs; ComfyUI adds B @ A to the fused weight, the same delta (zero blocks cost
space: the blog's LoRA, 18.7 MB in diffusers' layout, is ~73 MB here). kohya's has no final layer: see `left_out`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import FluxnbError
from ..base.files import atomic_write_bytes, save_tensors
from ..base.temps import remove_abandoned_files
from ..config import EXPORT_FORMATS as FORMATS
from ..model.lora import NAMES, adapter_type, file_type, read_adapter
from ..run import LORA_FILE, RunDir
from . import lycoris

# diffusers module (inside transformer_blocks.N / single_transformer_blocks.N / the model) -> (BFL name, part).
# part is the index inside a fused BFL Linear, or None for a 1:1 module. Read off diffusers' converter.
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1",
}
# kohya's FLUX LoRA (sd-scripts' networks/lora_flux.py) has slots in the blocks and the input embedders only: its
# inference (flux_minimal_inference) loads strictly and refuses these keys ("Unexpected key(s) ...
# lora_unet_final_layer_*"), its merge tool skips them without a word. The kohya/ComfyUI file leaves them out.
NO_KOHYA_SLOT = ("final_layer_linear", "final_layer_adaLN_modulation_1")
_PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted Linear: delta W = scale * up @ down."""

    down: torch.Tensor  # A (r, in)
    up: torch.Tensor  # B (out, r)
    scale: float  # alpha / r (alpha / sqrt(r) with rsLoRA)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def is_zero(self) -> bool:
        return bool(self.up.abs().max() == 0 or self.down.abs().max() == 0)


def relative_error(got: LoraPair, want: LoraPair) -> float:
    """||dW_got - dW_want||_F / ||dW_want||_F without building either (out, in) matrix.

    dW_got - dW_want = U @ V with U = [s1 B1, -s2 B2] (out, r1+r2), V = [A1; A2] (r1+r2, in), and
    ||U V||_F^2 = trace((U^T U)(V V^T)): two small Gram matrices. FLUX.1-dev has 190 adapted 3072-wide layers;
    the direct way would multiply out 190 matrices of 9.4 M numbers, twice.
    """
    def norm(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(torch.trace((u.T @ u) @ (v @ v.T)).clamp_min(0).sqrt())

    u = torch.cat([got.scale * got.up.double(), -want.scale * want.up.double()], 1)
    v = torch.cat([got.down.double(), want.down.double()], 0)
    return norm(u, v) / max(norm(want.scale * want.up.double(), want.down.double()), 1e-300)


def _config(state: dict, alphas: dict | None, metadata: dict | None):
    """The peft LoraConfig exactly as diffusers builds it when it loads this file (ranks, alphas, patterns)."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    if metadata:
        kwargs = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    else:
        ranks = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
        alphas = {k.removeprefix("transformer."): v for k, v in (alphas or {}).items()}
        kwargs = get_peft_kwargs(ranks, alphas, state)
    return LoraConfig(**kwargs)


def read_lora(source: str | Path | dict[str, torch.Tensor]) -> dict[str, LoraPair]:
    """{transformer module name: LoraPair}, read by diffusers' own loader (any format it knows, kohya included)."""
    from diffusers import FluxPipeline
    from peft.utils.other import get_pattern_key

    if isinstance(source, dict):
        name, where = "the state dict", dict(source)  # diffusers' converters pop keys: give them a copy
        kwargs = {}
    else:
        path = Path(source)
        if not path.is_file():
            raise FluxnbError(f"{path} does not exist: train a LoRA first (notebook 03 / `python -m fluxnb train`).")
        name, where, kwargs = path.name, str(path.parent), {"weight_name": path.name}
    state, alphas, metadata = FluxPipeline.lora_state_dict(where, return_alphas=True, return_lora_metadata=True, **kwargs)
    other = sorted({k.split(".")[0] for k in state if not k.startswith("transformer.")})
    if other:
        raise FluxnbError(f"{name} has LoRA weights that diffusers' load_lora_weights does not put into the "
                          f"transformer ({', '.join(other)}); fluxnb handles transformer LoRAs only.")
    if (kind := adapter_type(state)) != "lora":
        raise FluxnbError(f"{name} is a {NAMES[kind]}, not LoRA pairs: fluxnb.infer.lycoris exports it.")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    cfg = _config(state, alphas, metadata)
    pairs = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")  # peft's own lookup of per-module rank and alpha patterns
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
        pairs[module] = LoraPair(state[key], state[f"{module}.lora_B.weight"], alpha / (math.sqrt(r) if cfg.use_rslora else r))
    if not pairs:
        raise FluxnbError(f"{name} holds no LoRA weights for the transformer.")
    return pairs


def bfl_name(module: str) -> tuple[str, int | None]:
    """diffusers module name -> (BFL/kohya name, part of a fused Linear or None)."""
    if match := _BLOCK.match(module):
        kind, index, rest = match.groups()
        table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        if rest in table:
            name, part = table[rest]
            return f"{prefix}_{index}_{name}", part
    elif module in _TOP:
        return _TOP[module], None
    raise FluxnbError(f"the LoRA adapts '{module}', which has no counterpart in the ComfyUI/kohya FLUX layout.")


def _fuse(parts: dict[int, LoraPair], n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n LoRAs on the slices of one fused Linear -> one LoRA: A stacked (n*r, in), B block-diagonal (out, n*r)."""
    first = parts[min(parts)]
    r, scale, dtype = max(p.rank for p in parts.values()), first.scale, first.up.dtype
    attn_rows = next((p.up.shape[0] for i, p in parts.items() if i < 3), None)
    attn_rows = attn_rows or parts[3].up.shape[0] // 4  # FLUX single blocks: mlp width = 4 x attention width
    downs, ups = [], []
    for i in range(n):
        rows = attn_rows * 4 if i == 3 else attn_rows
        if i in parts:  # pad to the common rank with zeros; fold a differing scale into B so alpha/R fits all
            p = parts[i]
            down = torch.zeros(r, p.down.shape[1], dtype=dtype)
            down[: p.rank] = p.down
            up = torch.zeros(rows, r, dtype=dtype)
            up[:, : p.rank] = p.up if p.scale == scale else p.up * (p.scale / scale)
        else:  # a slice without a LoRA: zero block, so the layout stays block-diagonal
            down, up = torch.zeros(r, first.down.shape[1], dtype=dtype), torch.zeros(rows, r, dtype=dtype)
        downs.append(down)
        ups.append(up)
    return torch.cat(downs), torch.block_diag(*ups), scale * n * r


def left_out(loras: dict[str, LoraPair]) -> list[str]:
    """The modules of `loras` that the kohya/ComfyUI file leaves out: kohya's FLUX LoRA has no slot for them."""
    return sorted(m for m in loras if bfl_name(m)[0] in NO_KOHYA_SLOT)


def left_out_note(modules: list[str]) -> str:
    return (f"left out of the ComfyUI/kohya file: {', '.join(modules)} (FLUX's final layer: kohya's LoRA has no slot "
            "there and its loader refuses the keys); the diffusers file keeps them")


def to_comfyui(loras: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """diffusers-named LoRA pairs -> kohya state dict with BFL names (lora_unet_*.lora_down/lora_up/alpha), without
    the modules kohya has no slot for (`left_out`)."""
    groups: dict[str, dict[int | None, LoraPair]] = {}
    for module, pair in loras.items():
        name, part = bfl_name(module)
        if name not in NO_KOHYA_SLOT:
            groups.setdefault(name, {})[part] = pair
    out = {}
    for name, parts in sorted(groups.items()):
        if None in parts:
            pair = parts[None]
            down, up, alpha = pair.down, pair.up, pair.scale * pair.rank
        else:
            down, up, alpha = _fuse(parts, next(n for suffix, n in _PARTS.items() if name.endswith(suffix)))
        key = f"lora_unet_{name}"
        out |= {f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                f"{key}.alpha": torch.tensor(float(alpha))}
    return out


# diffusers' kohya reader hard-codes FLUX.1-dev's single-block widths (q, k, v 3072 each, mlp 12288).
FLUX_DEV_LINEAR1_ROWS = 3 * 3072 + 12288


def comfyui_name(run: RunDir) -> str:
    return f"{run.name}_comfyui.safetensors"


def export_path(run: RunDir, fmt: str) -> Path:
    """RUN/export/<run name>_comfyui.safetensors, or RUN/export/pytorch_lora_weights.safetensors for diffusers."""
    return run.export / (comfyui_name(run) if fmt == "comfyui" else LORA_FILE)


def comfyui_metadata(loras: dict[str, LoraPair]) -> dict[str, str]:
    """kohya's header fields, which Forge and LoRA browsers show; the weights carry their own alphas."""
    rank = max(p.rank for p in loras.values())
    alpha = next(p.scale * p.rank for p in loras.values() if p.rank == rank)
    return {"format": "pt", "ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", "ss_base_model_version": "flux1", "fluxnb_layout": "kohya-bfl"}


def export_lora(lora: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the LoRA file `lora` to `out` as `fmt`: "diffusers" or "comfyui" (DoRA, LoKr: fluxnb.infer.lycoris)."""
    if fmt not in FORMATS:
        raise FluxnbError(f"export format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}.")
    plain = file_type(lora) == "lora"  # DoRA and LoKr: LyCORIS's layout (fluxnb.infer.lycoris)
    loras, out = read_lora(lora) if plain else read_adapter(lora), Path(out)  # reading also validates a copy
    remove_abandoned_files(out.parent, [out.name])  # what a killed export of this file left, and nothing else
    if fmt == "diffusers":
        if Path(lora).resolve() != out.resolve():
            atomic_write_bytes(out, Path(lora).read_bytes())  # byte copy: keeps diffusers' rank/alpha metadata
    else:
        tensors, meta = (to_comfyui(loras), comfyui_metadata(loras)) if plain else lycoris.comfyui(loras)
        save_tensors(out, tensors, metadata=meta)
    return out


@dataclass
class RoundTrip:
    """How the exported file, read back by diffusers, compares with the original, module by module."""

    checked: int  # modules whose delta W was compared
    max_error: float  # max over modules of ||dW_export - dW_original||_F / ||dW_original||_F
    zero_extras: int  # modules only in the export (zero padding of fused Linears), all verified to be zero
    unchecked: dict[str, list[str]]  # why diffusers cannot read some modules back -> those modules
    left_out: list[str]  # modules the export does not hold (left_out): kohya has no slot for them

    def __str__(self) -> str:
        lines = [f"{self.checked} modules match after the round trip (max relative error {self.max_error:.1e})"]
        if self.zero_extras:
            lines.append(f"{self.zero_extras} zero padding blocks read back as zero")
        lines += [f"{len(mods)} modules not checked: {why}" for why, mods in self.unchecked.items()]
        return "\n".join(lines + ([left_out_note(self.left_out)] if self.left_out else []))  # a line per finding


_NARROW = (f"diffusers' kohya reader assumes FLUX.1-dev's single-block widths ({FLUX_DEV_LINEAR1_ROWS} rows in "
           "linear1), which this model does not have; ComfyUI reads them")
_TOP_LEVEL = ("diffusers' kohya reader drops LoRAs on the input embedders (img_in, txt_in, time/vector/guidance_in); "
              "ComfyUI and kohya read them")


def check_round_trip(original: str | Path, exported: str | Path) -> RoundTrip:
    """Read `exported` back through diffusers' loader and compare every module's delta W with `original` (to a few
    units of rounding of the file's dtype: the kohya reader multiplies A by alpha / r once)."""
    from safetensors.torch import load_file

    if file_type(original) != "lora":  # read back by ComfyUI's rules: diffusers reads no LyCORIS FLUX.1 file
        return RoundTrip(*lycoris.compare(original, exported), 0, {}, [])
    want, state = read_lora(original), load_file(str(exported))
    dropped = left_out(want)
    top = {f"lora_unet_{name}" for name in _TOP.values() if name not in NO_KOHYA_SLOT}
    narrow = {k.split(".")[0] for k, v in state.items()
              if re.fullmatch(r"lora_unet_single_blocks_\d+_linear1\.lora_up\.weight", k) and v.shape[0] != FLUX_DEV_LINEAR1_ROWS}
    got = read_lora({k: v for k, v in state.items() if k.split(".")[0] not in narrow | top})
    unchecked = {why: sorted(m for m in want if f"lora_unet_{bfl_name(m)[0]}" in groups)
                 for why, groups in ((_NARROW, narrow), (_TOP_LEVEL, top))}
    unchecked = {why: mods for why, mods in unchecked.items() if mods}
    skipped = {m for mods in unchecked.values() for m in mods} | set(dropped)
    missing = sorted(set(want) - set(got) - skipped)
    if missing:
        raise FluxnbError(f"{Path(exported).name} lost {len(missing)} modules in the round trip, e.g. {missing[0]}.")
    errors = [relative_error(got[m], want[m]) for m in want if m not in skipped]
    extras = [m for m in got if m not in want]
    tol = 8 * torch.finfo(next(iter(want.values())).up.dtype).eps
    if max(errors, default=0.0) > tol or not all(got[m].is_zero() for m in extras):
        raise FluxnbError(f"{Path(exported).name} does not read back as the same LoRA (max relative error "
                          f"{max(errors, default=0.0):.2e} > {tol:.1e}, or a padding block is not zero).")
    return RoundTrip(len(errors), max(errors, default=0.0), len(extras), unchecked, dropped)
