"""Weights trained by other implementations, brought into fastcaps' layouts."""

from __future__ import annotations

import re
from typing import List, Sequence, Union

from torch import Tensor

from ..validation import describe

__all__ = ["convert_weight"]

_DENSE = ("out_caps", "in_caps", "out_dim", "in_dim")  # DigitCaps.weight
_CONV = ("out_caps", "in_caps", "kh", "kw", "out_dim", "in_dim")  # ConvCaps2d.weight


def _parse(layout: Union[str, Sequence[str]]) -> List[List[str]]:
    """The weight's axes, each a list of the names merged into it: "(kh kw in_caps) in_dim" ->
    [["kh", "kw", "in_caps"], ["in_dim"]]."""
    text = layout if isinstance(layout, str) else " ".join(layout)
    if not re.fullmatch(r"(\s*(\([\w\s]+\)|\w+))*\s*", text):
        raise ValueError(f"convert_weight: layout must be names and parenthesised groups of names, got {text!r}")
    return [group.split() if group else [name] for group, name in re.findall(r"\(([\w\s]+)\)|(\w+)", text)]


def convert_weight(weight: Tensor, layout: Union[str, Sequence[str]], **sizes: int) -> Tensor:
    """Bring a capsule layer's weight saved in another layout into fastcaps' own: DigitCaps'
    (out_caps, in_caps, out_dim, in_dim), or ConvCaps2d's (out_caps, in_caps, kh, kw, out_dim,
    in_dim) when the layout names kh and kw.

    ``layout`` names the axes of ``weight`` in order, as a space-separated string or a
    sequence, from out_caps, in_caps, out_dim, in_dim (and kh, kw), plus "1" for a singleton
    axis to drop. An axis that merges several, in row-major order, is written as a group in
    parentheses, e.g. "(kh kw in_caps)" for an axis whose index is (kh * Kw + kw) * I + i;
    ``sizes`` gives the sizes of a group's names, all but at most one per group. Examples of
    public layouts:

        (J, I, Din, D)             "out_caps in_caps in_dim out_dim"      e.g. gram-ai/capsule-networks
        (1, I, J, D, Din)          "1 in_caps out_caps out_dim in_dim"    e.g. higgsfield/Capsule-Network-Tutorial
        (K*K*I, J*D, Din)          "(kh kw in_caps) (out_caps out_dim) in_dim", kh=K, kw=K, out_caps=J
                                   the unfold-based convolutional layers: F.unfold's (i, kh, kw)
                                   rows permuted to (kh, kw, i)

    Use it as ``caps.weight.data.copy_(convert_weight(w, layout, ...))``; a shape mismatch then
    raises in copy_.
    """
    groups = _parse(layout)
    names = [name for group in groups for name in group if name != "1"]
    target = _CONV if "kh" in names or "kw" in names else _DENSE
    if sorted(names) != sorted(target):
        raise ValueError(f"convert_weight: layout must name each of {target} once (and '1' for singleton "
                         f"axes), got {groups}")
    if len(groups) != weight.dim():
        raise ValueError(f"convert_weight: layout {groups} names {len(groups)} axes but weight has "
                         f"{weight.dim()} ({describe(weight)})")
    unknown = set(sizes) - set(names)
    if unknown:
        raise ValueError(f"convert_weight: sizes given for {sorted(unknown)}, which the layout does not name")
    split: List[int] = []
    for axis, group in enumerate(groups):
        length = weight.shape[axis]
        if group == ["1"]:
            if length != 1:
                raise ValueError(f"convert_weight: axis {axis} is marked '1' but has size {length}")
            continue
        if "1" in group:
            raise ValueError(f"convert_weight: '1' stands alone, not inside the group {group}")
        missing = [name for name in group if name not in sizes]
        if len(group) > 1 and len(missing) > 1:
            raise ValueError(f"convert_weight: axis {axis} merges {group}; give the sizes of all but one of "
                             f"them (missing: {missing})")
        known = 1
        for name in group:
            known *= sizes.get(name, 1)
        if length % known != 0 or (not missing and known != length):
            raise ValueError(f"convert_weight: axis {axis} has size {length}, which {group} with sizes "
                             f"{ {name: sizes[name] for name in group if name in sizes} } does not make")
        split += [sizes[name] if name in sizes else length // known for name in group]
    flat = weight.reshape(split)
    return flat.permute([names.index(name) for name in target]).contiguous()
