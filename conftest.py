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

_SERIES_TEST = Path(__file__).resolve().parent / "tests" / "test_notebooks.py"


def pytest_ignore_collect(collection_path, config):
    """Run the notebook series once per session. tests/test_notebooks.py executes it with fluxnb's own runner (as
    `python -m fluxnb notebooks` does) and checks the executed copies; when it is collected too (plain
    `python3 -m pytest`), nbval skips notebooks/ instead of executing everything a second time. `python3 -m pytest
    notebooks` still runs them through nbval, cell by cell."""
    if collection_path.suffix != ".ipynb":
        return None
    here = Path(config.invocation_params.dir)
    targets = [(here / str(arg).split("::")[0]).resolve() for arg in config.args]
    if any(t == _SERIES_TEST or t in _SERIES_TEST.parents for t in targets):
        return True
    return None
