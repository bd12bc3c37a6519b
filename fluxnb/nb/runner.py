"""Run the notebook series top to bottom, headless: what `python -m fluxnb notebooks` does.

Each notebook executes in a fresh kernel (like "Restart & run all"), in order, all on one run directory.
The executed copies, with their outputs, go to <run dir>/executed/; the notebooks in git stay clean.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in only)]
    return paths


def run_notebooks(run_dir: Path | None = None, *, only: list[str] | None = None, timeout: int = 3600) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from ..hardware import detect
    from ..run import RUN_DIR_ENV, default_run_dir

    paths = notebook_paths(only)
    if not paths:
        print(f"no notebooks found in {NOTEBOOK_DIR}")
        return 1
    run_dir = Path(run_dir) if run_dir else default_run_dir(detect().profile)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # the kernels inherit it: all notebooks share one run
    os.environ.setdefault("MPLBACKEND", "Agg")
    out_dir = run_dir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        start = time.perf_counter()
        print(f"running {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except CellExecutionError as err:
            nbformat.write(nb, out_dir / path.name)
            print(f"{path.name} failed; the executed copy with the error is {out_dir / path.name}\n{err}")
            return 1
        nbformat.write(nb, out_dir / path.name)
        print(f"  done in {time.perf_counter() - start:.0f} s -> {out_dir / path.name}", flush=True)
    print(f"all {len(paths)} notebooks ran; results in {run_dir}")
    return 0
