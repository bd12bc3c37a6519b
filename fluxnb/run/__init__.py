"""The machine and the run: where fluxnb computes and the one folder every notebook reads and writes.

    hardware  which profile runs, on which device, in which dtype (FLUXNB_GPU_MEMORY_GIB / _CAPABILITY emulate)
    lock      one writing process per run directory (RUN/.lock), released when its process dies
    dir       RunDir: every path of a run directory, and the constants of its file names
    records   metrics.jsonl and the gallery's prompts.json: the small records several steps read
    open      Run and open_run (every notebook's first cell), the @writes lock for writing steps
"""

from .dir import LORA_FILE, RUN_DIR_ENV, RunDir, default_run_dir
from .open import Run, default_config, open_existing_run, open_run, writes

__all__ = ["LORA_FILE", "RUN_DIR_ENV", "Run", "RunDir", "default_config", "default_run_dir", "open_existing_run", "open_run",
           "writes"]
