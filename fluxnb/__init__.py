"""fluxnb: fine-tune FLUX.1-dev into your own style with QLoRA, one notebook at a time.

The notebooks in notebooks/ explain; this package computes. Each module is small and named for its step:
config (what to run), hardware (where), cache (the run directory), tiny (an offline stand-in model),
memory (what it costs). See README.md for the map.
"""

import logging

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package (which downloads
# kernels from the Hub) is absent. fluxnb never needs it: its built-in CPU NF4 kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
