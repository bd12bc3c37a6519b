"""fluxnb: fine-tune FLUX.1-dev into your own style with QLoRA, one notebook at a time.

The notebooks in notebooks/ explain; this package computes. Its folders follow the pipeline:

    data/   notebooks 01-02: dataset checks, cached text embeddings and VAE latents
    model/  the NF4 transformer and its LoRA, shared by training and inference
    train/  notebook 03: the flow-matching step and the training loop
    infer/  notebook 04: sampling, merging, export
    share/  notebook 05: model card and upload
    nb/     what only notebooks need: forms and the headless runner

and on top: config (what to run), hardware (where), run (the run directory), presets, memory, tiny (the offline
stand-in model), cli. A module imports only from its own floor or below (README, Development).
"""

import logging

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package (which downloads
# kernels from the Hub) is absent. fluxnb never needs it: its built-in CPU NF4 kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
