import matplotlib
from PIL import Image

from fluxnb.config import DataConfig, TrainConfig
from fluxnb.nb.widgets import config_form
from fluxnb.plots import image_grid, loss_plot

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
