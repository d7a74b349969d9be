"""The one shape record of a dynamic-routing call and the one factory of its inputs, shared by
the launchers, ``fastcaps check``, ``fastcaps bench``, the ahead-of-time compile and the tests.

Field order follows the tensors: u (batch, in_caps, in_dim) routes to v (batch, out_caps,
out_dim) through weight (out_caps, in_caps, out_dim, in_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .reference import squash
from .validation import conv_output_size

__all__ = ["RoutingShape", "RoutingInputs", "make_inputs", "INITS", "ConvShape", "make_conv_inputs", "VotesShape",
           "make_votes_inputs", "EMShape", "make_em_inputs"]


@dataclass(frozen=True)
class RoutingShape:
    batch: int
    in_caps: int
    in_dim: int
    out_caps: int
    out_dim: int

    @property
    def u_shape(self) -> Tuple[int, int, int]:
        return (self.batch, self.in_caps, self.in_dim)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_caps, self.in_caps, self.out_dim, self.in_dim)

    @property
    def v_shape(self) -> Tuple[int, int, int]:
        return (self.batch, self.out_caps, self.out_dim)

    @property
    def capsules(self) -> str:
        """The capsule dimensions without the batch, e.g. "1152x8 -> 10x16"."""
        return f"{self.in_caps}x{self.in_dim} -> {self.out_caps}x{self.out_dim}"

    def with_batch(self, batch: int) -> "RoutingShape":
        return replace(self, batch=batch)

    def __str__(self) -> str:
        return f"B{self.batch} I{self.in_caps} Din{self.in_dim} J{self.out_caps} D{self.out_dim}"


class RoutingInputs(NamedTuple):
    u: Tensor  # (B, I, Din)
    weight: Optional[Tensor]  # (J, I, D, Din); None for given votes (u holds them)
    bias: Optional[Tensor]  # (J, D) or None
    grad_v: Tensor  # (B, J, D): the gradient a backward is taken along


# How the weights are drawn:
# - "routing": predictions of length ~1, so the agreement logits are O(1) and the couplings
#   move away from 1/J (what a correctness check needs to see);
# - "digitcaps": DigitCaps' initialisation, std = J / sqrt(I D) (what a layer starts from).
INITS = ("routing", "digitcaps")


def make_inputs(shape: RoutingShape, seed: int, bias: bool = False, init: str = "routing",
                dtype: torch.dtype = torch.float64, device="cpu") -> RoutingInputs:
    """Inputs like squashed primary capsules (length < 1), drawn in float64 from a generator
    seeded with ``seed`` on the CPU, then cast to ``dtype`` and moved to ``device``."""
    if init not in INITS:
        raise ValueError(f"make_inputs: init must be one of {INITS}, got {init!r}")
    generator = torch.Generator().manual_seed(seed)

    def normal(*size, std=1.0):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * std

    if init == "routing":
        u = squash(normal(*shape.u_shape, std=2.0))
        weight = normal(*shape.weight_shape, std=2.0 / math.sqrt(shape.out_dim))
    else:
        u = squash(normal(*shape.u_shape))
        weight = normal(*shape.weight_shape, std=shape.out_caps / math.sqrt(shape.in_caps * shape.out_dim))
    b = normal(shape.out_caps, shape.out_dim, std=0.5) if bias else None
    grad_v = normal(*shape.v_shape)
    return RoutingInputs(*(None if t is None else t.to(device=device, dtype=dtype) for t in (u, weight, b, grad_v)))


@dataclass(frozen=True)
class ConvShape:
    """A convolutional capsule layer's call: u (batch, in_caps, in_dim, height, width) routes
    to v (batch, out_caps, out_dim, H', W') through weight (out_caps, in_caps, kh, kw, out_dim,
    in_dim); kernel, stride, padding and dilation are pairs."""
    batch: int
    in_caps: int
    in_dim: int
    height: int
    width: int
    out_caps: int
    out_dim: int
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def u_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.in_caps, self.in_dim, self.height, self.width)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_caps, self.in_caps, *self.kernel, self.out_dim, self.in_dim)

    @property
    def out_grid(self) -> Tuple[int, int]:
        return tuple(conv_output_size(*axis) for axis in
                     zip((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation))

    @property
    def v_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.out_caps, self.out_dim, *self.out_grid)

    @property
    def children(self) -> int:
        """Capsules in a window: in_caps * kh * kw."""
        return self.in_caps * self.kernel[0] * self.kernel[1]

    def with_batch(self, batch: int) -> "ConvShape":
        return replace(self, batch=batch)

    def __str__(self) -> str:
        extras = "".join(f" {name}{a}x{b}" for name, (a, b), plain in
                         (("s", self.stride, (1, 1)), ("p", self.padding, (0, 0)), ("d", self.dilation, (1, 1)))
                         if (a, b) != plain)
        return (f"B{self.batch} I{self.in_caps} Din{self.in_dim} {self.height}x{self.width} J{self.out_caps} "
                f"D{self.out_dim} K{self.kernel[0]}x{self.kernel[1]}{extras}")


def make_conv_inputs(shape: ConvShape, seed: int, bias: bool = False, init: str = "routing",
                     dtype: torch.dtype = torch.float64, device="cpu") -> RoutingInputs:
    """``make_inputs`` for a convolutional layer: u (B, I, Din, H, W) squashed over Din, weight
    (J, I, Kh, Kw, D, Din), bias (J, D), grad_v (B, J, D, H', W'); "digitcaps" init counts the
    children of a window."""
    if init not in INITS:
        raise ValueError(f"make_conv_inputs: init must be one of {INITS}, got {init!r}")
    generator = torch.Generator().manual_seed(seed)

    def normal(*size, std=1.0):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * std

    u = squash(normal(*shape.u_shape, std=2.0 if init == "routing" else 1.0), dim=2)
    std = 2.0 / math.sqrt(shape.out_dim) if init == "routing" else shape.out_caps / math.sqrt(
        shape.children * shape.out_dim)
    weight = normal(*shape.weight_shape, std=std)
    b = normal(shape.out_caps, shape.out_dim, std=0.5) if bias else None
    grad_v = normal(*shape.v_shape)
    return RoutingInputs(*(None if t is None else t.to(device=device, dtype=dtype) for t in (u, weight, b, grad_v)))


@dataclass(frozen=True)
class VotesShape:
    """A call of routing from given votes: votes (batch, positions, in_caps, out_caps, out_dim)
    route to v (batch, positions, out_caps, out_dim), each (sample, position) on its own."""
    batch: int
    positions: int
    in_caps: int
    out_caps: int
    out_dim: int

    @property
    def votes_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.positions, self.in_caps, self.out_caps, self.out_dim)

    def with_batch(self, batch: int) -> "VotesShape":
        return replace(self, batch=batch)

    def __str__(self) -> str:
        return f"B{self.batch} P{self.positions} I{self.in_caps} J{self.out_caps} D{self.out_dim}"


def make_votes_inputs(shape: VotesShape, seed: int, bias: bool = False, dtype: torch.dtype = torch.float64,
                      device="cpu") -> RoutingInputs:
    """``make_inputs`` for routing from given votes: ``u`` holds the votes (batch, positions, I,
    J, D), of length about 2 so that the couplings move away from 1/J; ``weight`` is None."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*size, std=1.0):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * std

    votes = normal(*shape.votes_shape, std=2.0 / math.sqrt(shape.out_dim))
    b = normal(shape.out_caps, shape.out_dim, std=0.5) if bias else None
    grad_v = normal(shape.batch, shape.positions, shape.out_caps, shape.out_dim)
    return RoutingInputs(*(None if t is None else t.to(device=device, dtype=dtype) for t in (votes, None, b, grad_v)))


@dataclass(frozen=True)
class EMShape:
    """An EM-routing call: poses (batch, in_caps, P, P, *grid) and activations (batch, in_caps,
    *grid) route to out_caps parents. ``kernel`` given: a convolutional layer (weight
    (out_caps, in_caps, kh, kw, P, P); stride, padding, dilation pairs; ``normalization``);
    ``kernel`` None: a class layer (weight (out_caps, in_caps, P, P), shared over the grid;
    an empty grid is a dense layer)."""
    batch: int
    in_caps: int
    out_caps: int
    grid: Tuple[int, ...] = ()
    pose: int = 4
    kernel: Optional[Tuple[int, int]] = None
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    normalization: str = "per_child"
    coordinate_addition: bool = False

    @property
    def conv(self) -> bool:
        return self.kernel is not None

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        middle = tuple(self.kernel) if self.conv else ()
        return (self.out_caps, self.in_caps, *middle, self.pose, self.pose)

    @property
    def windows(self) -> int:
        """Routings per sample: the output positions of a conv layer, 1 otherwise."""
        if not self.conv:
            return 1
        return math.prod(conv_output_size(*axis) for axis in
                         zip(self.grid, self.kernel, self.stride, self.padding, self.dilation))

    @property
    def children(self) -> int:
        """Capsules each parent routes from."""
        if self.conv:
            return self.in_caps * self.kernel[0] * self.kernel[1]
        return self.in_caps * math.prod(self.grid)

    def with_batch(self, batch: int) -> "EMShape":
        return replace(self, batch=batch)

    def __str__(self) -> str:
        grid = "x".join(map(str, self.grid)) or "dense"
        if self.conv:
            extras = "".join(f" {name}{a}x{b}" for name, (a, b), plain in
                             (("s", self.stride, (1, 1)), ("p", self.padding, (0, 0)), ("d", self.dilation, (1, 1)))
                             if (a, b) != plain)
            return (f"B{self.batch} I{self.in_caps} {grid} J{self.out_caps} P{self.pose} "
                    f"K{self.kernel[0]}x{self.kernel[1]}{extras} {self.normalization}")
        return (f"B{self.batch} I{self.in_caps} {grid} J{self.out_caps} P{self.pose} class"
                f"{' +coords' if self.coordinate_addition else ''}")


def make_em_inputs(shape: EMShape, seed: int, dtype: torch.dtype = torch.float64, device="cpu") -> List[Tensor]:
    """[poses, activations, weight, beta_u, beta_a]: unit-normal poses, activations uniform in
    [0, 1], weight ~ Normal(0, 1 / sqrt(P)) (the layers' initialisation), betas ~ Normal(0, 0.5),
    drawn in float64 from a generator seeded with ``seed``, then cast and moved."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*size, std=1.0):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * std

    poses = draw(shape.batch, shape.in_caps, shape.pose, shape.pose, *shape.grid)
    activations = torch.rand(shape.batch, shape.in_caps, *shape.grid, generator=generator, dtype=torch.float64)
    tensors = [poses, activations, draw(*shape.weight_shape, std=shape.pose ** -0.5), draw(shape.out_caps, std=0.5),
               draw(shape.out_caps, std=0.5)]
    return [t.to(device=device, dtype=dtype) for t in tensors]
