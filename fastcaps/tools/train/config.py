"""The settings of ``fastcaps train``, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["TrainConfig", "MODEL_FIELDS", "MODELS"]

# Fields that fix the model's shape or its data; a checkpoint resumes only with the same ones.
MODEL_FIELDS = ("data_dir", "model", "image_size", "conv_channels", "primary_channels", "iterations", "seed",
                "limit")
# --model: the paper's CapsNet, or with a ConvCaps2d layer (types, dim) between PrimaryCaps and DigitCaps.
MODELS = {"capsnet": None, "conv": (16, 12)}


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None  # MNIST IDX files; None: scikit-learn's digits
    model: str = "capsnet"  # a key of MODELS
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.96  # the paper's code: lr * lr_decay ** (step / lr_decay_steps)
    lr_decay_steps: int = 2000
    max_shift: int = 2
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    compile: bool = False
    out: str = "train-out"
    resume: Optional[str] = None
    image_size: int = 28
    conv_channels: int = 256
    primary_channels: int = 32
    iterations: int = 3
    limit: Optional[int] = None  # first N training and test samples, for quick runs
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr_decay_steps", "image_size", "conv_channels",
                     "primary_channels", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastcaps train: {name} must be an int >= 1, got {value!r}")
        if self.model not in MODELS:
            raise ValueError(f"fastcaps train: model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not self.lr > 0:
            raise ValueError(f"fastcaps train: lr must be > 0, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"fastcaps train: lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if self.max_shift < 0:
            raise ValueError(f"fastcaps train: max_shift must be >= 0, got {self.max_shift!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"fastcaps train: limit must be >= 1, got {self.limit!r}")
