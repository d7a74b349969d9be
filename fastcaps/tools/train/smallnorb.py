"""smallNORB (LeCun, Huang & Bottou 2004) for ``fastcaps train --model em``: the reader of its
NYU binary-matrix files and the EM paper's preprocessing. Nothing is downloaded.

Files (in --data-dir, each plain or gzipped):
    smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat   24,300 stereo pairs
    smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat    24,300 stereo pairs
dat: uint8 (N, 2, 96, 96), the two cameras; cat: int32 (N,) in 0..4; info: int32 (N, 4)
(instance, elevation, azimuth, lighting). Each file starts with a header: a magic number
(0x1E3D4C55 uint8, 0x1E3D4C54 int32), the number of dimensions, and max(3, ndim) sizes, all
little-endian int32.

Preprocessing (Hinton, Sabour & Frosst 2018, section 5): each image downsampled to 48 x 48
and normalised to zero mean and unit variance; training takes random 32 x 32 crops with random
brightness and contrast, test the centre 32 x 32 crop. ``camera``: "left" (the pair's first
image; the default: the paper does not say which it used, and one camera is what most
reproductions take), "right", or "both" as two channels.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .data import Digits

__all__ = ["SMALLNORB_FILES", "NORBError", "read_norb", "load_smallnorb", "norb_train_views", "centre_crop",
           "is_smallnorb_dir", "CAMERAS"]

SMALLNORB_FILES = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat",
}
SPLIT_SIZE = 24300
CAMERAS = ("left", "right", "both")
_TYPES = {0x1E3D4C55: (np.uint8, "uint8"), 0x1E3D4C54: (np.int32, "int32"), 0x1E3D4C51: (np.float32, "float32"),
          0x1E3D4C53: (np.float64, "float64"), 0x1E3D4C56: (np.int16, "int16")}
_EXPECTED = {"dat": ("uint8", (2, 96, 96)), "cat": ("int32", ()), "info": ("int32", (4,))}


class NORBError(ValueError):
    """A file that is not the smallNORB data it should be: names the file and what is wrong."""


def _path(data_dir: str, split: str, kind: str) -> str:
    name = SMALLNORB_FILES[split].format(kind)
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"smallNORB: {name} (or {name}.gz) not found in {data_dir!r}. fastcaps does not "
                            "download; put the six smallNORB .mat files there")


def is_smallnorb_dir(data_dir: str) -> bool:
    """Whether data_dir holds smallNORB's training images (then --data-dir means smallNORB)."""
    name = SMALLNORB_FILES["train"].format("dat")
    return any(os.path.isfile(os.path.join(data_dir, name + ext)) for ext in ("", ".gz"))


def read_norb(path: str) -> np.ndarray:
    """One NYU binary-matrix file (plain or gzipped) as a numpy array, checked against its
    header: magic, number of dimensions and exact length."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise NORBError(f"{path}: a damaged or truncated gzip file ({error})") from None
    if len(data) < 8:
        raise NORBError(f"{path}: {len(data)} bytes, too short for a smallNORB header")
    magic, dims = (int.from_bytes(data[k:k + 4], "little") for k in (0, 4))
    if magic not in _TYPES:
        raise NORBError(f"{path}: not a smallNORB matrix (magic {magic:#010x}; expected 0x1e3d4c55 for bytes or "
                        "0x1e3d4c54 for ints)")
    if not 1 <= dims <= 8:
        raise NORBError(f"{path}: a header with {dims} dimensions")
    header = 8 + 4 * max(3, dims)
    if len(data) < header:
        raise NORBError(f"{path}: truncated inside its header ({len(data)} of {header} bytes)")
    shape = tuple(int.from_bytes(data[8 + 4 * k:12 + 4 * k], "little") for k in range(dims))
    dtype, _ = _TYPES[magic]
    expected = header + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise NORBError(f"{path}: {state}: the header gives shape {shape}, {expected} bytes in all, the file has "
                        f"{len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _read_checked(data_dir: str, split: str, kind: str, size: int) -> np.ndarray:
    path = _path(data_dir, split, kind)
    array = read_norb(path)
    dtype, trailing = _EXPECTED[kind]
    if array.dtype != np.dtype(dtype) or tuple(array.shape[1:]) != trailing:
        raise NORBError(f"{path}: holds {array.dtype} of shape {tuple(array.shape)}; smallNORB's {kind} file holds "
                        f"{dtype} of shape (N{''.join(', ' + str(d) for d in trailing)})")
    if len(array) != size:
        raise NORBError(f"{path}: {len(array)} entries; smallNORB's {split} split has {size}")
    return array


def load_smallnorb(data_dir: str, camera: str = "left", split_size: Optional[int] = None) -> Tuple[Digits, Digits]:
    """The train and test splits: images (N, 1 or 2, 48, 48) float32, each camera's image
    downsampled from 96 x 96 (2 x 2 means) and normalised to zero mean and unit variance; labels int64 in 0..4.
    ``split_size``: the entries each split must hold (default SPLIT_SIZE, 24,300; tests write
    smaller files)."""
    split_size = SPLIT_SIZE if split_size is None else split_size
    if camera not in CAMERAS:
        raise ValueError(f"smallNORB: camera must be one of {CAMERAS}, got {camera!r}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"smallNORB: --data-dir {data_dir!r} is not a directory")
    splits = []
    for split in ("train", "test"):
        pairs = _read_checked(data_dir, split, "dat", split_size)
        labels = _read_checked(data_dir, split, "cat", split_size)
        _read_checked(data_dir, split, "info", split_size)
        if len(labels) and (labels.min() < 0 or labels.max() > 4):
            bad = int(np.argmax((labels < 0) | (labels > 4)))
            raise NORBError(f"{_path(data_dir, split, 'cat')}: category {int(labels[bad])} at index {bad}; "
                            "smallNORB's categories are 0..4")
        chosen = {"left": pairs[:, :1], "right": pairs[:, 1:], "both": pairs}[camera]
        images = torch.from_numpy(chosen.astype(np.float32) / 255.0)
        images = torch.nn.functional.interpolate(images, size=(48, 48), mode="area")
        # Each camera's image on its own, so that "both" holds the "left" and "right" images.
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        splits.append(Digits((images - mean) / std, torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def norb_train_views(images: Tensor, generator: torch.Generator, size: int = 32, brightness: float = 0.2,
                     contrast: float = 0.3) -> Tensor:
    """Random size x size crops, each with a random brightness offset in [-brightness,
    brightness] and contrast factor in [1 - contrast, 1 + contrast] (about the image's mean),
    all drawn from ``generator``."""
    count, _, height, width = images.shape
    ys = torch.randint(0, height - size + 1, (count,), generator=generator)
    xs = torch.randint(0, width - size + 1, (count,), generator=generator)
    shift = (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1) * brightness
    scale = 1 + (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1) * contrast
    crops = torch.stack([images[k, :, y:y + size, x:x + size] for k, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    return (crops - mean) * scale + mean + shift


def centre_crop(images: Tensor, size: int = 32) -> Tensor:
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]
