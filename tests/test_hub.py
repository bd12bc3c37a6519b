"""Model card, staging, dry run and upload (against a fake HfApi), and the token never leaking anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from lora_helpers import make_lora
from PIL import Image

from fluxnb.cli import main
from fluxnb.config import RunConfig
from fluxnb.base.errors import FluxnbError
from fluxnb.run.hardware import detect
from fluxnb.infer import sampling
from fluxnb.run import Run, RunDir, open_run
from fluxnb.share import hub

FAKE_TOKEN = "hf_fakeTOKENfluxnb0123456789abcdefXYZ"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory) -> Run:
    """A finished tiny run: LoRA, notebook 04's gallery and grid, one metrics line."""
    run = open_run(tmp_path_factory.mktemp("hubrun") / "run", profile="tiny", verbose=False)
    make_lora(run.config.model.model_id, run.dir.lora)
    prompts = run.config.data.validation_prompts[:2]
    images = [Image.new("RGB", (64, 96), c) for c in ("teal", "orange")]
    sampling.save_images(run.dir.gallery, prompts, images, sampling.default_settings(run))
    images[0].save(run.dir.comparison)
    run.dir.metrics.write_text(json.dumps({"step": 40, "loss": 0.41}) + "\n")
    return run


@pytest.fixture
def online(monkeypatch, tmp_path):
    """As if the Hub were reachable, with no token anywhere (tests add one through HF_TOKEN when they need it)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for key in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)


class FakeApi:
    """Records what push() asks of the Hub; `fail` makes the upload raise like a dropped connection."""

    calls: list = []
    fail: Exception | None = None
    existing_private: bool | None = None  # a repo that already exists with this visibility (None: a new repo)

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        self.private = kwargs.get("private") if FakeApi.existing_private is None else FakeApi.existing_private
        return huggingface_hub.RepoUrl(f"https://huggingface.co/me/{repo_id.split('/')[-1]}")

    def repo_info(self, repo_id):
        return SimpleNamespace(private=self.private)

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        if FakeApi.fail:
            raise FakeApi.fail


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail, FakeApi.existing_private = [], None, None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_card_contents(run):
    staged = hub.stage(run, hub.HubSettings(repo_id="me/tiny-lora"))
    card = ModelCard(staged.card)
    data = card.data.to_dict()
    assert data["license"] == "other" and {"lora", "flux", "text-to-image"} <= set(data["tags"])
    assert data["instance_prompt"] == "tnyst style"  # the shared last phrase of every caption
    assert [w["output"]["url"] for w in data["widget"]] == ["images/00.png", "images/01.png"]
    assert data["widget"][0]["text"] == run.config.data.validation_prompts[0]
    assert "base_model" not in data  # a local tiny model is no Hub id
    c = run.config
    for line in (f"| LoRA rank | {c.lora.rank} |", f"| LoRA targets | {c.lora.targets} |", "| optimizer steps (done) | 40 |",
                 f"| learning rate | {c.train.learning_rate} |", "Test artifact",
                 'pipe.load_lora_weights("me/tiny-lora"', "run_comfyui.safetensors"):
        assert line in card.text
    assert str(run.path) not in staged.card and str(run.config.model.model_id) not in staged.card  # no local paths


def test_card_for_flux_dev_names_base_model_and_licence(run, tmp_path):
    real = Run(RunDir(tmp_path), RunConfig(profile="real"), detect("real"))
    data = ModelCard(hub.card_text(real, "mucha style", "x_comfyui.safetensors", [], "flux-lora")).data
    assert data.base_model == "black-forest-labs/FLUX.1-dev"
    assert data.license_name == "flux-1-dev-non-commercial-license" and data.instance_prompt == "mucha style"


def test_card_for_krea_names_its_base_model_and_licence(run, tmp_path):
    krea = RunConfig(profile="real").replace(model={"base": "FLUX.1-Krea-dev"})
    card = hub.card_text(Run(RunDir(tmp_path), krea, detect("real")), "mucha style", "x_comfyui.safetensors", [],
                         "flux-lora")
    data = ModelCard(card).data
    assert data.base_model == "black-forest-labs/FLUX.1-Krea-dev"
    assert data.license_name == "flux-1-dev-non-commercial-license" and "FLUX.1-Krea-dev/blob" in data.license_link
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-Krea-dev"' in card and "| base | FLUX.1-Krea-dev |" in card
    # A local copy of it: no Hub id to claim, but the text says which FLUX.1 the folder holds.
    local = krea.replace(model={"model_id": str(tmp_path)})
    card = hub.card_text(Run(RunDir(tmp_path), local, detect("real")), "", "x_comfyui.safetensors", [], "flux-lora")
    assert ModelCard(card).data.base_model is None and "A LoRA for a local base model (FLUX.1-Krea-dev)" in card


def test_dry_run_lists_exactly_the_files_and_the_card(run, capsys):
    settings = hub.HubSettings(repo_id="tiny-lora")
    staged = hub.stage(run, settings)
    on_disk = sorted(p.relative_to(staged.folder).as_posix() for p in staged.folder.rglob("*") if p.is_file())
    assert [name for name, _ in staged.files] == on_disk == [
        "README.md", "images/00.png", "images/01.png", "images/base_vs_lora.png",
        "pytorch_lora_weights.safetensors", "run_comfyui.safetensors"]
    assert (staged.folder / "pytorch_lora_weights.safetensors").read_bytes() == (run.dir.lora / hub.LORA_FILE).read_bytes()
    result = hub.push(run, staged, settings)
    assert not result.uploaded and str(result).startswith("dry run: nothing was uploaded")
    assert "private repo 'tiny-lora'" in str(result) and "--dry-run" in str(result)
    assert capsys.readouterr().out == ""  # notebook 05 shows the file list and the card in their own cells, once
    assert main(["push", "--run-dir", str(run.path), "--repo-id", "tiny-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "private model repo 'tiny-lora'" in out and all(name in out for name in on_disk)
    assert out.count(staged.card) == 1 and out.count("dry run: nothing was uploaded") == 1


def test_without_token_it_is_a_dry_run_that_says_why(run, online, fake_api):
    settings = hub.HubSettings(repo_id="tiny-lora", dry_run=False)
    result = hub.push(run, hub.stage(run, settings), settings)
    assert not result.uploaded and "notebook_login" in result.message
    assert fake_api.calls == []


def test_offline_is_a_dry_run_too(run, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = hub.HubSettings(repo_id="tiny-lora", dry_run=False)
    result = hub.push(run, hub.stage(run, settings), settings)
    assert not result.uploaded and "offline" in result.message and fake_api.calls == []


def test_upload_is_private_by_default(run, online, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    settings = hub.HubSettings(repo_id="tiny-lora", dry_run=False)
    staged = hub.stage(run, settings)
    result = hub.push(run, staged, settings)
    (_, repo_id, create), (_, upload) = fake_api.calls
    assert result.uploaded and result.url == "https://huggingface.co/me/tiny-lora"
    assert repo_id == "tiny-lora" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny-lora" and Path(upload["folder_path"]) == staged.folder
    assert "token" not in create and "token" not in upload  # huggingface_hub reads it itself
    assert 'load_lora_weights("me/tiny-lora"' in (staged.folder / "README.md").read_text()  # full id in the snippet


def test_failed_upload_is_reported_not_raised_and_scrubbed(run, online, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    fake_api.fail = ConnectionError(f"connection reset (Authorization: Bearer {FAKE_TOKEN})")
    settings = hub.HubSettings(repo_id="tiny-lora", dry_run=False)
    result = hub.push(run, hub.stage(run, settings), settings)
    assert not result.uploaded and "no files were published" in result.message and "ConnectionError" in result.message
    assert FAKE_TOKEN not in result.message


def test_bad_repo_id_is_refused():
    with pytest.raises(FluxnbError, match="not a valid Hub name"):
        hub.HubSettings(repo_id="two words/and/more")


@pytest.mark.parametrize("folder, repo_id", [("my run (v2)", "my-run-v2-flux-lora"), ("--.x..y--", "x.y-flux-lora"),
                                             ("é" * 3, "flux-lora"), ("a" * 120, "a" * 86 + "-flux-lora")])
def test_the_default_repo_id_is_a_valid_hub_name_for_any_run_folder(folder, repo_id, tmp_path):
    run = Run(RunDir(tmp_path / folder), RunConfig(), detect("tiny"))
    assert hub.default_settings(run).repo_id == repo_id  # notebook 05's settings cell, before its form


def _all_bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fake_token_appears_in_no_file_or_output(run, capfd, monkeypatch):
    """HF_TOKEN set: the card writer, the dry run (CLI in this process and in a fresh one) and a failed upload
    write and print nothing that contains it."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    settings = hub.HubSettings(repo_id="tiny-lora")
    hub.push(run, hub.stage(run, settings), settings)
    assert main(["push", "--run-dir", str(run.path), "--repo-id", "tiny-lora", "--dry-run"]) == 0
    assert main(["push", "--run-dir", str(run.path), "--repo-id", "tiny-lora"]) == 1  # offline: dry run, says so
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fluxnb", "push", "--run-dir", str(run.path), "--repo-id", "tiny-lora",
                           "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "dry run: nothing was uploaded" in proc.stdout
    printed = capfd.readouterr()
    files = _all_bytes(run.path)
    assert "README.md" in {p.name for p in files} and len(files) > 10
    assert FAKE_TOKEN not in printed.out + printed.err + proc.stdout + proc.stderr
    assert not [p for p, data in files.items() if FAKE_TOKEN.encode() in data]
    assert hub.scrub(f"oops {FAKE_TOKEN}") == "oops hf_***"


def test_stage_needs_a_trained_lora(tmp_path):
    empty = open_run(tmp_path / "empty", profile="tiny", verbose=False)
    with pytest.raises(FluxnbError, match="train the LoRA first"):
        hub.stage(empty, hub.HubSettings())


def test_an_existing_public_repo_is_not_filled_while_saying_private(run, online, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    fake_api.existing_private = False  # made public earlier (--public, or on the website)
    settings = hub.HubSettings(repo_id="tiny-lora", dry_run=False)
    result = hub.push(run, hub.stage(run, settings), settings)
    assert not result.uploaded and "already exists and is public" in result.message
    assert [c[0] for c in fake_api.calls] == ["create_repo"]  # nothing uploaded


def test_card_survives_quotes_and_pipes_and_hides_gone_local_paths(run):
    import ast
    import re

    odd = 'a "quoted" cat | with a pipe \\ backslash'
    config = run.config.replace(data={"dataset": "/content/gone-since-last-vm"})
    images = [{"prompt": odd, "file": "00.png", "seed": 0, "steps": 4, "lora_scale": 1.0}]
    card = hub.card_text(Run(run.dir, config, run.hw), "", "x_comfyui.safetensors", images, "me/x")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ast.parse(code)  # the snippet is valid Python whatever the prompt holds
    assert repr(odd) in code
    row = next(line for line in card.splitlines() if line.startswith("| ![a"))
    assert row.count(" | ") == 1  # the prompt's "|" does not split the table cell
    assert "gone-since-last-vm" not in card


def test_card_writes_what_users_typed_as_text_never_as_markup(run):
    """A trigger word or prompt holding HTML, a Markdown link or image, backticks or a line break that starts a
    heading stays text on the Hub's page: no tag, no link, no heading, no code span that ends early (issue 27)."""
    import re

    import markdown_it

    hostile = ["<script>alert(1)</script> a cat", "a dog <img src=x onerror=alert(2)>",
               "[click](javascript:alert(3)) a fox", "a bird\n# Injected heading\n<iframe src=//evil></iframe>",
               "a `tick` and ``` fences", "a card\n---\nbreaking the header"]
    images = [{"prompt": p, "file": f"{i:02d}.png", "seed": i, "steps": 4, "lora_scale": 1.0}
              for i, p in enumerate(hostile)]
    card = hub.card_text(run, "my `style` <b>x</b>\n# h", "x_comfyui.safetensors", images, "me/x")
    read = ModelCard(card)  # as the Hub and notebook 05 split it
    header, body = read.data.to_yaml(), read.text
    assert "Injected heading" not in header.replace("# Injected", "")  # one line per prompt in the YAML
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(body)
    inline = [t for tok in tokens if tok.type == "inline" for t in tok.children or []]
    assert not [t for t in tokens + inline if t.type in ("html_block", "html_inline")]
    links = [t.attrGet("href") for t in inline if t.type == "link_open"]
    assert all(href.startswith(("https://", "http://")) for href in links), links
    images_md = [t.attrGet("src") for t in inline if t.type == "image"]
    assert images_md == [f"images/{i:02d}.png" for i in range(len(hostile))]
    headings = [t for t in tokens if t.type == "heading_open"]
    assert len(headings) == 7  # the title and the card's own 6 sections: none from a prompt
    spans = [t.content for t in inline if t.type == "code_inline"]
    assert "my `style` <b>x</b> # h" in spans  # the trigger word, whole, verbatim
    code = re.search(r"(`{3,})python\n(.*?)\1", card, re.S).group(2)
    assert repr(hostile[0]) in code


def test_the_card_shown_in_the_notebook_carries_its_images(run):
    """Notebook 05 shows the card with its gallery images inside the page (relative links 404 in JupyterLab and in
    HTML exports); the staged README.md, which the Hub reads, keeps images/NN.png."""
    from fluxnb.share.card import inline_images

    staged = hub.stage(run, hub.HubSettings(repo_id="me/x"))
    assert staged.images and "](images/00.png)" in staged.card
    shown = inline_images(staged.card, staged.folder)
    assert "](images/" not in shown and shown.count("](data:image/jpeg;base64,") == len(staged.images)
    assert (staged.folder / "README.md").read_text() == staged.card


def test_push_without_a_token_says_why_first_and_how_to_log_in(run, online, fake_api, capsys):
    """The reason is the first line, `hf auth login` first among the ways to log in, and no model card above it
    (issue 26.6: the whole card was printed before the reason)."""
    capsys.readouterr()
    assert main(["push", "--run-dir", str(run.path), "--repo-id", "tiny-lora"]) == 1
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if not line.startswith("fluxnb: "))  # after open_run's lines
    assert first.startswith("nothing was uploaded: not logged in: run `hf auth login`"), out
    assert first.index("hf auth login") < first.index("notebook_login")
    assert "model card" not in out and "pytorch_lora_weights.safetensors" in out  # the file list, not the card
    assert fake_api.calls == []


def _notebook_05_shows(card: str, folder: Path, monkeypatch) -> tuple[str, str]:
    """Notebook 05's cell that shows the card, run on `card`: (the header it prints, the Markdown it shows)."""
    import IPython.display
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "05_share_to_hub.ipynb", as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and "staged.card" in c.source)
    printed, shown = [], []
    monkeypatch.setattr(IPython.display, "Markdown", shown.append)
    exec(source, {"staged": SimpleNamespace(card=card, folder=folder), "print": printed.append})
    return str(printed[0]), shown[0]


def test_a_prompt_or_trigger_word_holding_dashes_keeps_the_cards_header_whole(run, tmp_path, monkeypatch):
    """Issue 27.13: a "---" inside a validation prompt or the trigger word ended the YAML header early where
    notebook 05 split the card at the first "---\n": a prompt that YAML wraps after its "---", one that ends with
    it, a trigger word with line breaks. The Hub's own reader (ModelCard, metadata_load) and notebook 05 agree."""
    import re

    from huggingface_hub import metadata_load
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    prompts = ["word " * 14 + "--- and more words after it", "a fox ---", "---", "a bird\n---\nin a tree"]
    config = run.config.replace(data={"instance_prompt": "mucha\n---\nstyle ---", "validation_prompts": prompts})
    images = [{"prompt": p, "file": f"{i:02d}.png", "seed": i, "steps": 4, "lora_scale": 1.0}
              for i, p in enumerate(prompts)]
    card = hub.card_text(Run(run.dir, config, run.hw), "", "x_comfyui.safetensors", images, "me/x")
    one_line = [" ".join(p.split()) for p in prompts]
    read = ModelCard(card)
    assert read.data.instance_prompt == "mucha --- style ---"
    assert [w["text"] for w in read.data.widget] == one_line
    (tmp_path / "README.md").write_text(card)
    assert metadata_load(tmp_path / "README.md") == read.data.to_dict()
    assert read.text.lstrip().startswith("# x") and read.text.count("## Trigger word") == 1
    header, body = _notebook_05_shows(card, tmp_path, monkeypatch)
    assert header.strip() == REGEX_YAML_BLOCK.search(card).group(2).strip()  # the header as written, all of it
    assert body == read.text and re.search(r"instance_prompt: .*style ---", header)
