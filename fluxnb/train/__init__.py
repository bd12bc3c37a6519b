"""Notebook 03: the NF4 transformer + LoRA, trained on the two caches.

    flow        the rectified-flow math, pure tensor functions
    step        one micro-batch's loss (the reference script's step), fixed-noise evaluation, the optimizer
    batches     the cached training set joined per sample, in a replayable order
    state       TrainState: everything that decides the rest of a run, with state_dict()/load_state_dict()
    checkpoint  checkpoints/step-N/, written whole or not at all (owner of that format)
    monitor     metrics.jsonl (owner), progress bar, live loss plot, sample grids
    speed       checkpointing, block offload and torch.compile, applied in one place
    offload     frozen block weights streamed from CPU RAM during the step
    validation  held-out images, their loss at fixed noise, the best checkpoint by it
    loop        `train(run)`: the loop itself, top to bottom
"""

from .batches import CachedDataset, TrainingData
from .loop import TrainingDiverged, TrainingOutOfMemory, TrainResult, load_scales, prepare_transformer, train
from .state import TrainState
from .step import LatentScale, evaluate, make_optimizer, training_step

__all__ = ["CachedDataset", "LatentScale", "TrainResult", "TrainState", "TrainingData", "TrainingDiverged",
           "TrainingOutOfMemory", "evaluate", "load_scales", "make_optimizer", "prepare_transformer", "train",
           "training_step"]
