"""Real handwritten digits for ``fastcaps train``, offline: scikit-learn's scanned digits by
default, MNIST from its IDX files when the user has them. Nothing is downloaded.

Both give images as float32 (N, 1, size, size) in [0, 1] and labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Digits", "load_sklearn_digits", "load_mnist_idx", "read_idx", "IDXError", "MNIST_FILES"]


class Digits(NamedTuple):
    images: Tensor  # (N, 1, size, size) float32 in [0, 1]
    labels: Tensor  # (N,) int64


class IDXError(ValueError):
    """A file that is not the IDX data it should be: names the file and what is wrong."""


# --- scikit-learn's digits ----------------------------------------------------------------


def load_sklearn_digits(image_size: int = 28, test_fraction: float = 0.2, seed: int = 0) -> Tuple[Digits, Digits]:
    """The 1,797 8x8 digits that scikit-learn ships (UCI optical digits, 16 grey levels),
    split into train and test with a fixed seed, per class so that both halves keep the
    class balance.

    Each 8x8 image is scaled bilinearly to 20x20 and centred on an image_size canvas, the
    way MNIST centres its 20x20 digits in 28x28."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("fastcaps train: the default data needs scikit-learn (pip install scikit-learn), "
                          "or point --data-dir at MNIST's IDX files") from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    images = _centre(images, digit_size=min(20, image_size), image_size=image_size)

    generator = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_mask[members[: round(len(members) * test_fraction)]] = True
    return Digits(images[~test_mask], labels[~test_mask]), Digits(images[test_mask], labels[test_mask])


def _centre(images: Tensor, digit_size: int, image_size: int) -> Tensor:
    scaled = torch.nn.functional.interpolate(images, size=(digit_size, digit_size), mode="bilinear",
                                             align_corners=False).clamp_(0, 1)
    before = (image_size - digit_size) // 2
    after = image_size - digit_size - before
    return torch.nn.functional.pad(scaled, (before, after, before, after))


# --- MNIST's IDX files --------------------------------------------------------------------

# split -> (images, labels), each accepted plain or gzipped, with '-' or '.' before "idx"
# (the archive's names, and what some unpackers write).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_UNSIGNED_BYTE = 0x08
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float",
              0x0E: "double"}


def _find(data_dir: str, name: str) -> str:
    dotted = name.replace("-idx", ".idx")
    candidates = [os.path.join(data_dir, base + ext) for base in (name, dotted) for ext in ("", ".gz")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"MNIST: {name} not found in {data_dir!r}: expected one of "
        f"{', '.join(os.path.basename(path) for path in candidates)}. "
        "fastcaps does not download; get the four IDX files of MNIST and point --data-dir at their folder"
    )


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x1f\x8b":  # gzip's magic, whatever the name says
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise IDXError(f"{path}: a damaged or truncated gzip file ({error})") from None


def read_idx(path: str, expected_dims: Optional[int] = None) -> np.ndarray:
    """An IDX file (plain or gzipped) of unsigned bytes as a numpy array, checked against its
    header: magic, element type, number of dimensions and exact length."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise IDXError(f"{path}: not an IDX file (the magic number starts {data[0]:#04x} {data[1]:#04x}, "
                       "expected 0x00 0x00)")
    dtype_code, dims = data[2], data[3]
    if dtype_code != _UNSIGNED_BYTE:
        kind = _IDX_TYPES.get(dtype_code, f"unknown type {dtype_code:#04x}")
        raise IDXError(f"{path}: holds {kind} data; MNIST's IDX files hold unsigned bytes (0x08)")
    if expected_dims is not None and dims != expected_dims:
        what = {1: "labels (1 dimension)", 3: "images (3 dimensions)"}.get(expected_dims, f"{expected_dims} dimensions")
        raise IDXError(f"{path}: has {dims} dimensions, expected {what}; are the image and label files swapped?")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IDXError(f"{path}: truncated inside its header ({len(data)} of {header} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(dims))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise IDXError(f"{path}: {state}: the header gives shape {shape}, {expected} bytes in all, "
                       f"the file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_split(data_dir: str, split: str, num_classes: int) -> Digits:
    image_name, label_name = MNIST_FILES[split]
    image_path, label_path = _find(data_dir, image_name), _find(data_dir, label_name)
    images, labels = read_idx(image_path, expected_dims=3), read_idx(label_path, expected_dims=1)
    if len(images) != len(labels):
        raise IDXError(f"MNIST {split}: {image_path} has {len(images)} images but {label_path} has "
                       f"{len(labels)} labels")
    if images.shape[1] != images.shape[2]:
        raise IDXError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]}, expected square images")
    if len(labels) and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise IDXError(f"{label_path}: label {int(labels[bad])} at index {bad}; labels must be in "
                       f"0..{num_classes - 1}")
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Digits(pixels, torch.from_numpy(labels.astype(np.int64)))


def load_mnist_idx(data_dir: str, num_classes: int = 10) -> Tuple[Digits, Digits]:
    """MNIST's train and test splits from the standard IDX files in data_dir."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"MNIST: --data-dir {data_dir!r} is not a directory")
    return _load_split(data_dir, "train", num_classes), _load_split(data_dir, "test", num_classes)
