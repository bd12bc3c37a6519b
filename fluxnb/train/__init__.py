"""Notebook 03: the NF4 transformer + LoRA, trained on the two caches.

    flow        the rectified-flow math, pure tensor functions
    step        one micro-batch's loss (the reference script's step), one optimizer step, fixed-noise evaluation
    batches     the cached training set joined per sample, in a replayable order
    state       TrainState: everything that decides the rest of a run, with state_dict()/load_state_dict()
    checkpoint  checkpoints/step-N/, written whole or not at all (owner of that format)
    monitor     progress bar, live loss plot, sample grids
    speed       checkpointing, block offload and torch.compile, applied in one place
    budget      the memory-budget policy: the fastest layout that fits a GPU's memory
    presets     named budgets, one per class of GPU (notebook 03's form, the CLI's `train`)
    validation  held-out images, their loss at fixed noise, the best checkpoint by it
    guard       what `train` checks before it touches anything, and Ctrl-C
    session     what `train` sets up and says: model, data, accelerator, messages
    loop        `train(run)`: the loop itself, top to bottom
"""

from .batches import CachedDataset, TrainingData
from .loop import TrainResult, train
from .session import TrainingDiverged, TrainingOutOfMemory, load_for_training, load_scales
from .state import TrainState
from .step import LatentScale, evaluate, make_optimizer, optimizer_step, training_step

__all__ = ["CachedDataset", "LatentScale", "TrainResult", "TrainState", "TrainingData", "TrainingDiverged",
           "TrainingOutOfMemory", "evaluate", "load_for_training", "load_scales", "make_optimizer",
           "optimizer_step", "train", "training_step"]
