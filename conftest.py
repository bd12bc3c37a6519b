"""pytest set-up shared by tests/ and the notebooks that nbval executes (their kernels inherit this env).

Everything runs offline on the tiny profile, in throw-away folders, headless.
"""

import os
import tempfile
from pathlib import Path

_scratch = Path(tempfile.mkdtemp(prefix="fluxnb-pytest-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLUXNB_PROFILE": "tiny",
    "FLUXNB_TINY_DIR": str(_scratch / "tiny"),  # notebooks build the tiny model once, here
    "FLUXNB_RUN_DIR": str(_scratch / "run"),  # notebooks 01-05 share this run directory, as a user's would
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_CACHE": str(_scratch / "datasets-cache"),
}.items():
    os.environ[key] = value
