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


class _DropLines(logging.Filter):
    """Drops the records of one logger whose message contains one of `parts`; every other record passes."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


# Lines every notebook and CLI command printed that say nothing about fluxnb's work, each dropped by its exact
# wording on its own logger (any other warning of these loggers still shows). All four come from importing
# diffusers, which imports torchao whenever it is installed (diffusers.quantizers checks is_torchao_available at
# import); fluxnb itself never imports it (its FP8 layer is its own: fluxnb.model.fp8).
_NOISE = {
    # torchao's CUDA-only kernels (mxfp8, cutlass) cannot load into a CPU build of torch; fluxnb uses none of them.
    "torchao": ("Failed to load ",),
    # torchao registers two Enums with torch.compile's pytree, which newer torch reports as deprecated.
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    # diffusers 0.42 looks for torchao tensor classes that torchao 0.18 moved; it only needs them to load
    # checkpoints saved by torchao, which fluxnb never reads.
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    # FluxPipeline imports CLIP/SigLIP image processors for FLUX's optional IP-adapter image encoder, which fluxnb
    # never loads; without torchvision transformers falls back to their PIL versions and says so.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}
for _name, _parts in _NOISE.items():
    logging.getLogger(_name).addFilter(_DropLines(*_parts))

__version__ = "0.1.0"
