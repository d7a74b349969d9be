"""Where ``fastcaps train`` gets its data, and how each batch is viewed: scikit-learn's digits
(the default) or MNIST's IDX files, with the CapsNet paper's shifts; smallNORB's files (with
``--model em``), with the EM paper's crops and jitter (smallnorb.py).

Every random draw of a batch comes from the epoch's generator and is made for the whole global
batch, so a resumed or distributed run sees the views an uninterrupted single process would."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .augment import shift_images
from .config import TrainConfig
from .data import Digits, load_mnist_idx, load_sklearn_digits
from .smallnorb import centre_crop, is_smallnorb_dir, load_smallnorb, norb_train_views

__all__ = ["TrainingData", "load_training_data"]


class TrainingData(NamedTuple):
    train: Digits
    test: Digits
    name: str
    num_classes: int
    in_channels: int
    train_view: Callable[[Tensor, torch.Generator], Tensor]  # a global batch's training views
    test_view: Callable[[Tensor], Tensor]


def load_training_data(config: TrainConfig) -> TrainingData:
    if config.data_dir is not None and is_smallnorb_dir(config.data_dir):
        if config.model != "em":
            raise ValueError(f"fastcaps train: {config.data_dir!r} holds smallNORB, which --model em trains "
                             f"(got --model {config.model})")
        train_set, test_set = load_smallnorb(config.data_dir, config.camera)
        data = TrainingData(train_set, test_set, f"smallNORB in {config.data_dir} ({config.camera} camera)", 5,
                            train_set.images.shape[1], norb_train_views, centre_crop)
    else:
        if config.data_dir is not None:
            train_set, test_set = load_mnist_idx(config.data_dir)
            size = train_set.images.shape[-1]
            if size != config.image_size:
                raise ValueError(f"fastcaps train: the IDX images are {size}x{size}; pass --image-size {size}")
            name = f"MNIST IDX in {config.data_dir}"
        else:
            train_set, test_set = load_sklearn_digits(config.image_size, seed=config.seed)
            name = "scikit-learn digits"

        def shifted(images: Tensor, generator: torch.Generator) -> Tensor:
            shifts = torch.randint(-config.max_shift, config.max_shift + 1, (len(images), 2), generator=generator)
            return shift_images(images, shifts)

        data = TrainingData(train_set, test_set, name, 10, 1, shifted, lambda images: images)
    if config.limit is not None:
        data = data._replace(train=Digits(*(t[: config.limit] for t in data.train)),
                             test=Digits(*(t[: config.limit] for t in data.test)))
    return data
