"""What only the notebooks need: ipywidgets forms that edit the config dataclasses, and the headless runner.

    widgets  config_form: a form over some fields of a dataclass, validated on every edit
    forms    training_form: notebook 03's preset chooser + LoRA/training/resolution forms
    runner   run_notebooks: the series top to bottom in fresh kernels (`python -m fluxnb notebooks`)
"""
