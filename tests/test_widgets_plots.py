from pathlib import Path

import matplotlib
from PIL import Image

from fluxnb.config import DataConfig, TrainConfig
from fluxnb.nb.widgets import config_form
from fluxnb.base.plots import image_grid, loss_plot

matplotlib.use("Agg")


def _widget(form, label):
    return next(w for w in form.children if getattr(w, "description", None) == label)


def test_form_edits_the_dataclass_in_place():
    cfg = TrainConfig()
    form = config_form(cfg, ["learning_rate", "max_train_steps", "optimizer"], "Training",
                       choices={"optimizer": ("adamw8bit", "adamw")})
    _widget(form, "max train steps").value = 50
    _widget(form, "optimizer").value = "adamw"
    assert (cfg.max_train_steps, cfg.optimizer) == (50, "adamw")


def test_form_rejects_bad_value_and_keeps_the_last_good_one():
    cfg = DataConfig()
    form = config_form(cfg, ["width", "validation_prompts"])
    _widget(form, "width").value = 500
    assert cfg.width == 512
    assert "multiple of 16" in form.children[-1].value
    _widget(form, "width").value = 640
    assert cfg.width == 640 and form.children[-1].value == ""
    _widget(form, "validation prompts").value = "a cat\n\na dog\n"
    assert cfg.validation_prompts == ["a cat", "a dog"]


def test_plots_make_figures():
    images = [Image.new("RGB", (32, 48), (i * 40, 0, 0)) for i in range(5)]
    fig = image_grid(images, [f"caption {i}" for i in range(5)], ncols=3)
    assert len(fig.axes) == 6
    fig = loss_plot(list(range(20)), [1.0 / (i + 1) for i in range(20)])
    assert len(fig.axes[0].lines) == 2


def test_loss_plot_draws_the_validation_loss_beside_the_training_loss():
    fig = loss_plot(list(range(1, 21)), [1.0 / i for i in range(1, 21)], val_steps=[5, 10, 15, 20],
                    val_losses=[0.5, 0.4, 0.42, 0.45])
    lines = fig.axes[0].lines
    assert len(lines) == 3 and list(lines[-1].get_xdata()) == [5, 10, 15, 20]


def test_caption_table_edits_the_plan_and_writes_only_when_asked(tmp_path):
    import json

    from fluxnb.data import captions
    from fluxnb.nb.captions import caption_table

    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 60), (200, 0, 0)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "mine"}) + "\n")
    plan = captions.plan_captions(tmp_path, DataConfig(dataset=str(tmp_path)))
    captions.caption_folder(plan, lambda images: ["a red square"] * len(images), progress=False)
    table = caption_table(plan)
    new_row, yours_row = table.children[1:]  # captions just written come first
    assert "new" in new_row.children[1].value and yours_row.children[2].value == "mine"
    new_row.children[2].value = "a red square, edited  "
    assert plan.rows[1]["text"] == "a red square, edited"
    assert "edited" not in (tmp_path / "metadata.jsonl").read_text()  # nothing written until asked
    captions.write_metadata(plan)
    assert json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[1])["text"] == "a red square, edited"


def test_a_finished_progress_bar_reads_finished_where_widgets_do_not_render(monkeypatch):
    """Issue 26.3: a notebook saves, beside tqdm's widget, the text the bar had when it appeared ("0%| 0/16"), which
    is all GitHub's viewer, nbconvert's HTML and the JSON show. fluxnb's bars end with their last line there."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the kernel inherits the environment: bars on
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
        "from fluxnb.data.checks import progress_bar\nfor _ in progress_bar(range(16), desc='checking images'): pass",
        "from fluxnb.base.progress import Bar\nfor _ in Bar(range(4), desc='passing', leave=False): pass",
        "bar = Bar(total=10, desc='stopped')\nbar.update(3)\nbar.close()")])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    finished, passing, stopped = (["".join(o["data"]["text/plain"]) for o in cell.outputs] for cell in nb.cells)
    assert len(finished) == 1 and "checking images: 100%" in finished[0] and "16/16" in finished[0], finished
    assert "application/vnd.jupyter.widget-view+json" in nb.cells[0].outputs[0]["data"]  # still a widget live
    assert passing == [""]  # leave=False: the widget hides itself, and its text goes too
    assert "3/10" in stopped[0]  # a stopped bar says where it stopped
