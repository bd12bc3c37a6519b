"""The offline stand-in: a tiny FLUX.1 pipeline and tiny captioners with the real classes and folder layouts, random
weights, built locally in seconds, and a generated dataset. What CI and a machine without a GPU run.

    flux       the tiny FLUX.1-dev pipeline and its generated image + caption dataset (ensure_tiny)
    captioner  the tiny Florence-2 captioner, and a tiny BLIP (ensure_tiny_captioner)
    pairs      a generated (control, instruction) -> target dataset for FLUX.1-Kontext-dev runs (ensure_tiny_pairs)
"""
