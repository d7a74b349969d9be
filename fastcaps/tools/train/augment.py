"""The data order and the augmentation of ``fastcaps train``: each epoch's order and shifts come
from a generator seeded by (seed, epoch), never from the global RNG, so a resumed run takes the
steps an uninterrupted one would."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["epoch_batches", "shift_images"]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> Tuple[List[Tensor], torch.Generator]:
    """The epoch's global batches (index tensors, full batches only) and the generator that
    then draws their shifts: both depend on (seed, epoch) alone."""
    generator = _epoch_generator(seed, epoch)
    order = torch.randperm(count, generator=generator)
    full = count // batch_size * batch_size
    return list(order[:full].split(batch_size)), generator


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Each image moved by its (dy, dx) in whole pixels, zero-filled (the paper's
    augmentation). shifts: (N, 2) integers."""
    if len(images) == 0:
        return images
    pad = int(shifts.abs().max())
    if pad == 0:
        return images
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return torch.stack([
        padded[k, :, pad - dy: pad - dy + height, pad - dx: pad - dx + width]
        for k, (dy, dx) in enumerate(shifts.tolist())
    ])
