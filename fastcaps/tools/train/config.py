"""The settings of ``fastcaps train``, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["TrainConfig", "MODEL_FIELDS", "MODELS", "MODEL_DEFAULTS"]

# Fields that fix the model's shape or its data; a checkpoint resumes only with the same ones.
MODEL_FIELDS = ("data_dir", "model", "image_size", "conv_channels", "primary_channels", "iterations", "seed",
                "limit", "em_sizes", "inverse_temperature", "camera", "margin_epochs")
# --model: the paper's CapsNet, or with a ConvCaps2d layer (types, dim) between PrimaryCaps and DigitCaps;
# em: MatrixCapsNet (EM routing, models.py).
MODELS = {"capsnet": None, "conv": (16, 12), "em": None}
# What --epochs, --batch-size, --lr, --lr-decay(-steps) and --iterations default to per model: the CapsNet paper's 1e-3 and 3
# iterations; for EM, 2 iterations and a larger rate, so that the offline digits reach 97 %
# within 15 minutes on 2 cores (docs/training.md).
_CAPSNET_DEFAULTS = dict(epochs=30, batch_size=32, lr=1e-3, lr_decay=0.96, lr_decay_steps=2000, iterations=3)
MODEL_DEFAULTS = {"capsnet": _CAPSNET_DEFAULTS, "conv": _CAPSNET_DEFAULTS,
                  # em: 40 epochs with the rate decayed to 0.15x by the last (0.9 every 100 steps of 45), so
                  # that the last epochs settle (docs/training.md)
                  "em": dict(_CAPSNET_DEFAULTS, epochs=40, lr=3e-3, lr_decay=0.9, lr_decay_steps=100, iterations=2)}


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None  # MNIST IDX files; None: scikit-learn's digits
    model: str = "capsnet"  # a key of MODELS
    epochs: Optional[int] = None  # None: MODEL_DEFAULTS of the model (also lr, iterations)
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_decay: Optional[float] = None  # the paper's code: lr * lr_decay ** (step / lr_decay_steps)
    lr_decay_steps: Optional[int] = None
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
    iterations: Optional[int] = None
    em_sizes: Tuple[int, int, int, int] = (64, 8, 16, 16)  # --model em: MatrixCapsNet's A, B, C, D
    inverse_temperature: float = 1e-3  # --model em: lambda of every EM layer (docs/training.md)
    camera: str = "left"  # smallNORB: "left", "right" or "both" (two channels)
    margin_epochs: int = 6  # --model em: the spread loss's margin grows 0.2 -> 0.9 over this many epochs
    limit: Optional[int] = None  # first N training and test samples, for quick runs
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"fastcaps train: model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("epochs", "batch_size", "lr_decay_steps", "image_size", "conv_channels",
                     "primary_channels", "iterations", "margin_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastcaps train: {name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"fastcaps train: lr must be > 0, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"fastcaps train: lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if self.max_shift < 0:
            raise ValueError(f"fastcaps train: max_shift must be >= 0, got {self.max_shift!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"fastcaps train: limit must be >= 1, got {self.limit!r}")
        self.em_sizes = tuple(self.em_sizes)
        if len(self.em_sizes) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                          for v in self.em_sizes):
            raise ValueError(f"fastcaps train: em_sizes must be four ints >= 1 (A, B, C, D), got {self.em_sizes!r}")
        if self.camera not in ("left", "right", "both"):
            raise ValueError(f"fastcaps train: camera must be left, right or both, got {self.camera!r}")
        if not 0 < self.inverse_temperature < float("inf"):
            raise ValueError(f"fastcaps train: inverse_temperature must be > 0, got {self.inverse_temperature!r}")

