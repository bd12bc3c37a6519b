"""Notebook 04: your LoRA in a stock FluxPipeline, merged and re-quantized, exported for other tools.

    sampling  load the pipeline for this GPU, load/scale/blend LoRAs, base-vs-LoRA images at fixed seeds
    merge     fuse the LoRA into the 16-bit base, save, reload in NF4
    export    the LoRA in kohya/ComfyUI layout, with a round-trip check through diffusers' reader
"""
