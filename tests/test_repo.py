"""The repository's own promises: CI fails on 'no tests', notebooks stay small and clean, nbval is wired."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_embeddings", "02_cache_latents", "03_qlora_train", "04_inference_merge", "05_share_to_hub"]


def test_pytest_runs_the_notebooks_through_nbval():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in options["testpaths"]
    assert "--nbval-lax" in options["addopts"] and "--nbval-current-env" in options["addopts"]


def test_nbval_collects_every_notebook():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "notebooks"], cwd=ROOT,
                         capture_output=True, text=True)
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.name}::Cell 0" in out.stdout, out.stdout[-2000:]


def test_the_five_notebooks_exist_in_order():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_small_clean_and_tokenless(path):
    text = path.read_text()
    assert len(text) < 100_000, "strip outputs before committing"
    nb = json.loads(text)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit without outputs"
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), "a Hugging Face token is in the notebook"
    assert all(len("".join(c["source"]).splitlines()) <= 15 for c in code), "keep code cells short"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert all(kinds[i - 1] == "markdown" for i, k in enumerate(kinds) if k == "code" and i > 0), \
        "every code cell has a line of prose above it"
    assert "colab.research.google.com" in "".join(nb["cells"][0]["source"])


def test_ci_treats_no_tests_as_failure():
    script = (ROOT / ".ci" / "run").read_text()
    assert '"$rc" -eq 5' in script and "exit 1" in script
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m pytest" in script and "python3 -m pytest" in readme


def test_cli_builds_the_tiny_profile(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fluxnb", "tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "model" / "model_index.json").is_file() and (tmp_path / "dataset" / "metadata.jsonl").is_file()


def _names(path: Path) -> set[str]:
    """Package names a requirements file asks for (lower case, '-' for '_'), -r includes and comments left out."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[ ;]", line)[0].lower().replace("_", "-"))
    return names


def test_every_requirement_has_the_tested_version_in_the_constraints():
    """constraints.txt holds the versions the tests last passed with: every package the requirements ask for is
    pinned there exactly, torch is not (setup.sh pins it; Colab brings its own), and both set-up scripts use it."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    assert all(pins.values()) and "torch" not in pins
    wanted = _names(ROOT / "requirements.txt") | _names(ROOT / "requirements-dev.txt")
    assert wanted <= set(pins), sorted(wanted - set(pins))
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    assert "constraints.txt" in (ROOT / "colab_setup.sh").read_text()


def test_ci_sets_up_in_a_fresh_virtual_environment():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .ci/venv" in ci and "source .ci/venv/bin/activate" in ci
    assert ci.index("activate") < ci.index("bash scripts/setup.sh") < ci.index("python3 -m pytest")
