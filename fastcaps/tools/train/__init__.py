"""``fastcaps train``: the paper's CapsNet trained on real digits.

    config.py        TrainConfig
    data.py          scikit-learn's digits, MNIST's IDX files
    augment.py       each epoch's order and shifts, from (seed, epoch)
    distributed.py   torchrun: processes, slices of the global batch
    loop.py          train, evaluate, resume
    plots.py         reconstructions and curves
    command.py       the command line
"""

from .augment import epoch_batches, shift_images
from .config import TrainConfig
from .distributed import Processes, process_slice
from .loop import evaluate, train

__all__ = ["TrainConfig", "train", "evaluate", "epoch_batches", "shift_images", "process_slice", "Processes"]
