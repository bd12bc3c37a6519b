import json

import pytest

from fluxnb.config import BASES, ConfigError, DataConfig, LoRAConfig, ModelConfig, RunConfig, TrainConfig

DEV, KREA = BASES["FLUX.1-dev"], BASES["FLUX.1-Krea-dev"]


def test_defaults_are_the_blog_recipe():
    cfg = RunConfig()
    assert cfg.model.model_id == "black-forest-labs/FLUX.1-dev" and cfg.model.quantization == "nf4"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.lora.targets) == (4, 4.0, "gaussian", "attention")
    assert (cfg.data.width, cfg.data.height, cfg.data.max_sequence_length) == (512, 768, 77)
    t = cfg.train
    assert (t.learning_rate, t.lr_scheduler, t.batch_size, t.gradient_accumulation_steps) == (1e-4, "constant", 1, 4)
    assert (t.max_train_steps, t.guidance_scale, t.optimizer, t.gradient_checkpointing, t.seed) == (700, 1.0, "adamw8bit", True, 0)
    # issue 28's options are all off: FLUX.1-dev, 8-bit AdamW, no caption dropout, diffusers' uniform timesteps
    assert (cfg.model.base, t.caption_dropout, t.weighting_scheme) == ("FLUX.1-dev", 0.0, "none")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: DataConfig(width=500), "width"),
        (lambda: DataConfig(height=0), "height"),
        (lambda: DataConfig(max_sequence_length=600), "max_sequence_length"),
        (lambda: DataConfig(crop="middle"), "crop"),
        (lambda: LoRAConfig(rank=0), "rank"),
        (lambda: LoRAConfig(rank=-4), "rank"),
        (lambda: LoRAConfig(init="xavier"), "init"),
        (lambda: TrainConfig(learning_rate=0), "learning_rate"),
        (lambda: TrainConfig(learning_rate=-1e-4), "learning_rate"),
        (lambda: TrainConfig(max_train_steps=0), "max_train_steps"),
        (lambda: TrainConfig(weighting_scheme="sigma_sqrt"), "weighting_scheme"),
        (lambda: TrainConfig(optimizer="sgd"), "optimizer"),
        (lambda: TrainConfig(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (lambda: ModelConfig(quantization="int3"), "quantization"),
        (lambda: ModelConfig(dtype="fp8"), "dtype"),
        (lambda: ModelConfig(base="FLUX.1-schnell"), "base"),
        (lambda: ModelConfig(base="FLUX.1-dev", model_id=KREA), "base"),
        (lambda: TrainConfig(caption_dropout=1.0), "caption_dropout"),
        (lambda: TrainConfig(caption_dropout=-0.1), "caption_dropout"),
        (lambda: TrainConfig(sigmoid_scale=0.0), "sigmoid_scale"),
    ],
)
def test_bad_values_get_one_clear_message(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    message = str(err.value)
    assert field in message and len(message.splitlines()) == 1


def test_width_message_suggests_a_valid_value():
    with pytest.raises(ConfigError, match="try 496"):
        DataConfig(width=500)


def test_save_load_round_trip(tmp_path):
    cfg = RunConfig().replace(train={"max_train_steps": 50}, lora={"rank": 8, "alpha": 8.0})
    cfg.save(tmp_path)
    loaded = RunConfig.load(tmp_path)
    assert loaded == cfg and loaded.train.max_train_steps == 50
    assert json.loads((tmp_path / "config.json").read_text())["lora"]["rank"] == 8


def test_replace_validates():
    with pytest.raises(ConfigError, match="rank"):
        RunConfig().replace(lora={"rank": 0})


def _saved(tmp_path, edit=lambda raw: None):
    """tmp_path/config.json as fluxnb saves it, then edited by hand: `edit(raw)` changes the parsed dict."""
    RunConfig(profile="tiny").save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    return tmp_path / "config.json"


def test_load_rejects_unknown_keys_and_bad_json(tmp_path):
    _saved(tmp_path, lambda raw: raw["train"].update(learning_rat=1e-4))
    with pytest.raises(ConfigError, match="learning_rat"):
        RunConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(tmp_path)


def test_missing_config_says_which_step_to_run(tmp_path):
    with pytest.raises(Exception, match="notebook 01"):
        RunConfig.load(tmp_path / "nothing")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_inits_that_change_the_base_weights_are_refused(init, tmp_path):
    """Issue 26.8: peft's pissa/olora subtract the adapter's start from the frozen base while training, so every
    exported or merged LoRA was applied to the wrong base. Refused, also in a config.json written before."""
    with pytest.raises(ConfigError, match=f"init='{init}' changes the base model's weights") as err:
        LoRAConfig(init=init)
    assert "'gaussian'" in str(err.value) and len(str(err.value).splitlines()) == 1
    _saved(tmp_path, lambda raw: raw["lora"].update(init=init))
    with pytest.raises(ConfigError, match="changes the base model's weights"):
        RunConfig.load(tmp_path)


def test_the_base_gives_the_model_id_and_the_two_never_disagree(tmp_path):
    """model.base picks the FLUX.1 (its Hub repo is the default model_id); a base's repo given as model_id sets the
    base; a model_id that is no base's repo (a local copy, a mirror) stays whatever the base says."""
    assert (ModelConfig().model_id, ModelConfig(base="FLUX.1-Krea-dev").model_id) == (DEV, KREA)
    krea = RunConfig().replace(model={"base": "FLUX.1-Krea-dev"})
    assert krea.model.model_id == KREA and krea.replace(model={"base": "FLUX.1-dev"}).model.model_id == DEV
    assert RunConfig().replace(model={"model_id": KREA}).model.base == "FLUX.1-Krea-dev"  # the CLI's --model
    local = RunConfig().replace(model={"model_id": "/models/krea", "base": "FLUX.1-Krea-dev"})
    assert local.replace(model={"base": "FLUX.1-dev"}).model.model_id == "/models/krea"
    # A config.json from before model.base: its model_id says which base.
    _saved(tmp_path, lambda raw: [raw["model"].pop("base"), raw["model"].update(model_id=KREA)])
    assert RunConfig.load(tmp_path).model.base == "FLUX.1-Krea-dev"
    # One edited by hand to disagree: one line that says both ways out.
    _saved(tmp_path, lambda raw: raw["model"].update(model_id=DEV, base="FLUX.1-Krea-dev"))
    with pytest.raises(ConfigError, match="set base='FLUX.1-dev', or model_id to null") as err:
        RunConfig.load(tmp_path)
    assert len(str(err.value).splitlines()) == 1
    krea.save(tmp_path)
    assert RunConfig.load(tmp_path) == krea


def _text(old, new):
    return lambda path: path.write_text(path.read_text().replace(old, new))


def _edit(change):
    def edit(path):
        raw = json.loads(path.read_text())
        change(raw)
        path.write_text(json.dumps(raw, indent=2))
    return edit


# Issue 27.11: config.json edited by hand. Each one used to end in a traceback, be accepted (and train on
# nonsense: lr Infinity diverged, rank true became 1), or silently take a default for a whole missing section.
HAND_EDITS = {  # name -> (the edit, what the one line must say)
    "a string learning rate": (_edit(lambda c: c["train"].update(learning_rate="1e-4")),
                               'train.learning_rate="1e-4" must be a number (e.g. 0.0001)'),
    "learning rate 'inf'": (_edit(lambda c: c["train"].update(learning_rate="inf")),
                            'train.learning_rate="inf" must be a number'),
    "learning rate 1e999": (_text('"learning_rate": 0.0001', '"learning_rate": 1e999'),
                            "train.learning_rate=Infinity must be a finite number (e.g. 0.0001)"),
    "learning rate NaN": (_text('"learning_rate": 0.0001', '"learning_rate": NaN'),
                          "train.learning_rate=NaN must be a finite number"),
    "targets 5": (_edit(lambda c: c["lora"].update(targets=5)), 'lora.targets=5 must be a string (e.g. "attention")'),
    "train null": (_edit(lambda c: c.update(train=None)), "train=null must be an object"),
    "train a list": (_edit(lambda c: c.update(train=[])), "train=[] must be an object"),
    "no validation prompts": (_edit(lambda c: c["data"].update(validation_prompts=[])),
                              "data.validation_prompts=[] must hold at least one prompt"),
    "seed 'x'": (_edit(lambda c: c["train"].update(seed="x")), 'train.seed="x" must be an integer (e.g. 0)'),
    "rank true": (_edit(lambda c: c["lora"].update(rank=True)), "lora.rank=true must be an integer (e.g. 4)"),
    "rank 2.5": (_edit(lambda c: c["lora"].update(rank=2.5)), "lora.rank=2.5 must be an integer"),
    "width '512'": (_edit(lambda c: c["data"].update(width="512")), 'data.width="512" must be an integer (e.g. 512)'),
    "dataset null": (_edit(lambda c: c["data"].update(dataset=None)), "data.dataset=null must be a string"),
    "revision 3": (_edit(lambda c: c["model"].update(revision=3)), "model.revision=3 must be a string or null"),
    "an unknown key": (_edit(lambda c: c["train"].update(learning_rat=1e-4)), "unknown keys ['learning_rat']"),
    "a missing section": (_edit(lambda c: c.pop("model")), "the model section is missing: restore it"),
    "null": (lambda path: path.write_text("null"), "the config is null, not an object of sections"),
}


@pytest.mark.parametrize("case", list(HAND_EDITS))
def test_a_hand_edited_config_json_gets_one_line_in_the_cli_and_the_notebooks(case, tmp_path, capsys):
    from fluxnb.cli import main
    from fluxnb.run import open_run

    edit, says = HAND_EDITS[case]
    edit(_saved(tmp_path))
    with pytest.raises(ConfigError) as err:  # notebooks: every first cell's open_run
        open_run(tmp_path, verbose=False)
    shown = err.value._render_traceback_()  # what Jupyter shows instead of a traceback
    assert len(shown) == 1 and says in shown[0] and f"{tmp_path / 'config.json'}: " in shown[0], shown
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path)]) == 2  # python -m fluxnb train --run-dir D
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and says in out and len(out.splitlines()) == 1 and "Traceback" not in out, out


def test_a_config_json_without_newer_fields_takes_their_defaults(tmp_path):
    """Older config.json files lack the fields added since: each takes its default; the rest is kept."""
    _saved(tmp_path, lambda raw: [raw["train"].pop(k) for k in ("validate_every", "memory_budget_gib")]
           + [raw["train"].update(max_train_steps=50)])
    loaded = RunConfig.load(tmp_path).train
    assert (loaded.validate_every, loaded.memory_budget_gib, loaded.max_train_steps) == (25, 0.0, 50)
