"""Run the notebook series top to bottom, headless: what `python -m fluxnb notebooks` does.

Each notebook executes in a fresh kernel (like "Restart & run all"), in order, all on one run directory.
The executed copies, with their outputs, go to <run dir>/executed/; the notebooks in git stay clean. The kernels
draw figures with Jupyter's own inline backend, so an executed copy holds every figure a JupyterLab user sees.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..base.errors import FluxnbError

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# What ipykernel itself picks when MPLBACKEND is unset: figures become PNG outputs of their cell. A shell's
# MPLBACKEND=Agg (set for headless test processes) would otherwise reach the kernels and hide every figure.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The series in order, or those whose names start with one of `only`; a prefix that names none is an error."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    unknown = [prefix for prefix in only or () if not any(p.name.startswith(prefix) for p in paths)]
    if unknown:
        raise FluxnbError(f"no notebook's name starts with {', '.join(map(repr, unknown))}: the notebooks are "
                          f"{', '.join(p.stem for p in paths)}; give prefixes such as 01 02.")
    if only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in only)]
    return paths


@contextlib.contextmanager
def kernel_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the kernels started inside (they inherit them), and put them back after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client_parts():
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, DeadKernelError
        from traitlets.config import Config
    except ModuleNotFoundError as err:
        raise FluxnbError(f"running the notebooks headless needs {err.name}, which requirements.txt leaves out: "
                          "pip install -r requirements-dev.txt (or: pip install nbclient nbformat ipykernel)") from None
    config = Config()
    if os.name == "posix":  # unix sockets: no "Kernel is running over TCP without encryption" warning per notebook
        config.KernelManager.transport = "ipc"
        # An absolute socket path: the kernels start in notebooks/, where a relative one would not be found.
        config.KernelManager.ip = str(Path(tempfile.mkdtemp(prefix="fluxnb-kernel-")) / "kernel")
    return nbformat, NotebookClient, (CellExecutionError, DeadKernelError), config


def _running_cell(nb) -> str:
    """' while running code cell N (`its first line`)' for the cell that started and never finished, or ''."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    for number, cell in enumerate(code, 1):
        timing = cell.get("metadata", {}).get("execution")  # nbclient adds it when it sends the cell
        if timing is not None and "shell.execute_reply" not in timing:
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            return f" while running code cell {number} (`{first.strip()[:80]}`)"
    return ""


def run_notebooks(run_dir: Path | None = None, *, only: list[str] | None = None, timeout: int = 3600) -> int:
    paths = notebook_paths(only)  # first: a mistyped --only is told at once, before torch is imported
    from ..run import RUN_DIR_ENV, default_run_dir
    from ..run.hardware import detect

    nbformat, NotebookClient, (CellExecutionError, DeadKernelError), config = _client_parts()
    if not paths:
        print(f"no notebooks found in {NOTEBOOK_DIR}")
        return 1
    run_dir = Path(run_dir) if run_dir else default_run_dir(detect().profile)
    out_dir = run_dir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernels inherit these: all notebooks share one run, and draw figures as Jupyter does.
    with kernel_env({RUN_DIR_ENV: str(run_dir.resolve()), "MPLBACKEND": INLINE_BACKEND}):
        for path in paths:
            start = time.perf_counter()
            print(f"running {path.name} ...", flush=True)
            nb = nbformat.read(path, as_version=4)
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=config,
                                    resources={"metadata": {"path": str(path.parent)}})
            try:
                client.execute()
            except CellExecutionError as err:
                nbformat.write(nb, out_dir / path.name)
                print(f"{path.name} failed; the executed copy with the error is {out_dir / path.name}\n{err}")
                return 1
            except DeadKernelError:
                nbformat.write(nb, out_dir / path.name)
                print(f"{path.name}: the kernel died{_running_cell(nb)}. Most often the system ran out of RAM (the "
                      "OS, a container's or Colab's limit killed it): see README, Troubleshooting. What ran before is "
                      f"in {out_dir / path.name}; the run directory keeps everything earlier steps saved.")
                return 1
            nbformat.write(nb, out_dir / path.name)
            print(f"  done in {time.perf_counter() - start:.0f} s -> {out_dir / path.name}", flush=True)
    print(f"all {len(paths)} notebooks ran; results in {run_dir}")
    return 0
