"""Weights trained by other implementations, brought into fastcaps' layouts."""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor

from ..validation import describe

__all__ = ["convert_weight"]

_AXES = ("out_caps", "in_caps", "out_dim", "in_dim")


def convert_weight(weight: Tensor, layout: Union[str, Sequence[str]]) -> Tensor:
    """Bring a DigitCaps weight saved in another layout into fastcaps' (out_caps, in_caps,
    out_dim, in_dim).

    ``layout`` names the axes of ``weight`` in order, as a space-separated string or a
    sequence, from "out_caps", "in_caps", "out_dim", "in_dim", plus "1" for a singleton axis
    to drop. Examples of public layouts:

        (J, I, Din, D)      "out_caps in_caps in_dim out_dim"     e.g. gram-ai/capsule-networks
        (1, I, J, D, Din)   "1 in_caps out_caps out_dim in_dim"   e.g. higgsfield/Capsule-Network-Tutorial

    Use it as ``caps.weight.data.copy_(convert_weight(w, layout))``; a shape mismatch then
    raises in copy_.
    """
    names = layout.split() if isinstance(layout, str) else list(layout)
    if sorted(n for n in names if n != "1") != sorted(_AXES):
        raise ValueError(
            f"convert_weight: layout must name each of {_AXES} once (and '1' for singleton "
            f"axes), got {names}"
        )
    if len(names) != weight.dim():
        raise ValueError(
            f"convert_weight: layout {names} names {len(names)} axes but weight has "
            f"{weight.dim()} ({describe(weight)})"
        )
    for axis, name in enumerate(names):
        if name == "1" and weight.shape[axis] != 1:
            raise ValueError(
                f"convert_weight: axis {axis} is marked '1' but has size {weight.shape[axis]}"
            )
    kept = [axis for axis, name in enumerate(names) if name != "1"]
    squeezed = weight.reshape([weight.shape[axis] for axis in kept])
    kept_names = [names[axis] for axis in kept]
    return squeezed.permute([kept_names.index(name) for name in _AXES]).contiguous()
