"""The frozen FLUX transformer and its adapter, shared by training (notebook 03) and inference (notebook 04).

    quant   load the transformer: NF4 (QLoRA) on a GPU or the CPU, pre-quantized, plain 16-bit, or FP8
    fp8     the FP8 layer: e4m3 weights with per-channel scales, FP8 matmuls, gradient for the input only
    lora    add the LoRA adapter; owner of the LoRA files (stock diffusers format)
"""

from .lora import (
           add_lora,
           count_trainable,
           describe,
           load_lora_,
           lora_state_dict,
           save_lora,
)
from .quant import load_transformer, quantize_nf4_, save_fp8, save_nf4

__all__ = ["add_lora", "count_trainable", "describe", "load_lora_", "load_transformer", "lora_state_dict",
           "quantize_nf4_", "save_fp8", "save_lora", "save_nf4"]
