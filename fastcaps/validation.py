"""Argument checks shared by every routing entry point (the reference and the functional API):
errors name the argument and what was expected, so no backend ever sees input it would turn
into garbage. Also the one rule for the compute dtype of half inputs."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def check_routing_args(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool, leaky: bool = False
) -> None:
    """Raise TypeError/ValueError unless (u, weight, bias, iterations, detach_routing, leaky) is a routing call."""
    _check_floating("dynamic_routing", ("u", u), ("weight", weight))
    if u.dim() != 3:
        raise ValueError(
            f"dynamic_routing: u must have shape (batch, in_caps, in_dim), got {describe(u)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "dynamic_routing: weight must have shape (out_caps, in_caps, out_dim, in_dim), "
            f"got {describe(weight)}"
        )
    _, in_caps, in_dim = u.shape
    out_caps, w_in_caps, out_dim, w_in_dim = weight.shape
    if (w_in_caps, w_in_dim) != (in_caps, in_dim):
        raise ValueError(
            f"dynamic_routing: weight of shape {tuple(weight.shape)} expects u of shape "
            f"(batch, {w_in_caps}, {w_in_dim}), got u of shape {tuple(u.shape)}"
        )
    if out_caps < 1 or out_dim < 1 or in_dim < 1:
        raise ValueError(
            "dynamic_routing: out_caps, out_dim and in_dim must be at least 1, got weight of "
            f"shape {tuple(weight.shape)}"
        )
    _check_same(u, weight, "weight")
    _check_bias("dynamic_routing", u, bias, out_caps, out_dim)
    check_routing_options(iterations, detach_routing, leaky, "dynamic_routing")


def check_routing_options(iterations: int, detach_routing: bool, leaky: bool, where: str) -> None:
    """The options every dynamic-routing entry point shares."""
    # bool is an int subclass; iterations=True is a bug, not 1.
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"{where}: iterations must be an int >= 1, got {describe(iterations)}")
    if iterations < 1:
        raise ValueError(f"{where}: iterations must be >= 1, got {iterations}")
    for name, value in (("detach_routing", detach_routing), ("leaky", leaky)):
        if not isinstance(value, bool):
            raise TypeError(f"{where}: {name} must be a bool, got {describe(value)}")


def _check_same(u: Tensor, other: Tensor, name: str, where: str = "dynamic_routing", first: str = "u") -> None:
    if other.device != u.device:
        raise ValueError(
            f"{where}: {name} is on {other.device} but {first} is on {u.device}; "
            "move both to one device"
        )
    if other.dtype != u.dtype:
        raise TypeError(
            f"{where}: {name} has dtype {other.dtype} but {first} has dtype {u.dtype}; "
            "cast both to one dtype (as torch.nn.Linear requires)"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in: float32 for half types, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def renamed_detach(detach_routing: bool, detach: Optional[bool], where: str) -> bool:
    """``detach_routing``, or the value of its old keyword ``detach`` with a warning.

    Not said while dynamo traces (it cannot trace warnings.warn); the eager call says it."""
    if detach is None:
        return detach_routing
    if not torch.compiler.is_compiling():
        warnings.warn(f"{where}: the keyword 'detach' is deprecated; use 'detach_routing' (same meaning)",
                      FutureWarning, stacklevel=3)
    return detach


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """One spatial dimension of a convolutional layer's output, as nn.Conv2d computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pair(value, name: str, where: str = "conv_dynamic_routing"):
    """An int or a pair of ints, as nn.Conv2d takes kernel_size, stride, padding, dilation."""
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, (tuple, list)) or len(items) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in items)):
        raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {describe(value)}")
    return int(items[0]), int(items[1])


def check_conv_routing_args(u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, stride, padding,
                            dilation, detach_routing: bool, leaky: bool) -> None:
    """Raise TypeError/ValueError unless this is a convolutional routing call (stride, padding
    and dilation already pairs, ``pair``)."""
    where = "conv_dynamic_routing"
    _check_floating(where, ("u", u), ("weight", weight))
    if u.dim() != 5:
        raise ValueError(f"{where}: u must have shape (batch, in_caps, in_dim, height, width), got {describe(u)}")
    if weight.dim() != 6:
        raise ValueError(f"{where}: weight must have shape (out_caps, in_caps, kernel_h, kernel_w, out_dim, in_dim), "
                         f"got {describe(weight)}")
    _, in_caps, in_dim, height, width = u.shape
    out_caps, w_in_caps, kh, kw, out_dim, w_in_dim = weight.shape
    if (w_in_caps, w_in_dim) != (in_caps, in_dim):
        raise ValueError(f"{where}: weight of shape {tuple(weight.shape)} expects u of shape "
                         f"(batch, {w_in_caps}, {w_in_dim}, height, width), got u of shape {tuple(u.shape)}")
    if min(out_caps, kh, kw, out_dim, in_dim, in_caps) < 1:
        raise ValueError(f"{where}: every dimension of weight must be at least 1, got {describe(weight)}")
    check_window(where, (height, width), (kh, kw), stride, padding, dilation)
    _check_same(u, weight, "weight", where)
    _check_bias(where, u, bias, out_caps, out_dim)
    check_routing_options(iterations, detach_routing, leaky, where)


def check_window(where: str, grid, kernel, stride, padding, dilation) -> None:
    """stride >= 1, padding >= 0, dilation >= 1, and a window that fits the padded grid."""
    (height, width), (kh, kw) = grid, kernel
    for name, values, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if min(values) < least:
            raise ValueError(f"{where}: {name} must be at least {least}, got {values}")
    for axis, size, k in ((0, height, kh), (1, width, kw)):
        span = dilation[axis] * (k - 1) + 1
        if span > size + 2 * padding[axis]:
            raise ValueError(
                f"{where}: the window ({kh} x {kw}, dilation {dilation}) spans {span} along "
                f"{('height', 'width')[axis]}, larger than the padded grid ({size} + 2 * {padding[axis]}); "
                "expected a window that fits")


def check_votes_args(votes: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool,
                     leaky: bool) -> None:
    """Raise TypeError/ValueError unless this is a call of routing from given votes."""
    where = "route_votes"
    _check_floating(where, ("votes", votes))
    if votes.dim() < 3:
        raise ValueError(f"{where}: votes must have shape (..., in_caps, out_caps, out_dim), got {describe(votes)}")
    in_caps, out_caps, out_dim = votes.shape[-3:]
    if min(in_caps, out_caps, out_dim) < 1:
        raise ValueError(f"{where}: in_caps, out_caps and out_dim must be at least 1, got {describe(votes)}")
    _check_bias(where, votes, bias, out_caps, out_dim, "votes")
    check_routing_options(iterations, detach_routing, leaky, where)


def _check_floating(where: str, *named) -> None:
    for name, value in named:
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {describe(value)}")
        if not value.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor "
                            f"(float16, bfloat16, float32 or float64), got {describe(value)}")


def _check_bias(where: str, u: Tensor, bias: Optional[Tensor], out_caps: int, out_dim: int,
                first: str = "u") -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{where}: bias must be a tensor or None, got {describe(bias)}")
    if tuple(bias.shape) != (out_caps, out_dim):
        raise ValueError(f"{where}: bias must have shape (out_caps, out_dim) = ({out_caps}, {out_dim}), "
                         f"got {describe(bias)}")
    _check_same(u, bias, "bias", where, first)


# EM routing (matrix capsules).

def inverse_temperatures(value, iterations: int, where: str) -> list:
    """lambda per iteration: one positive number for every iteration, or a sequence of one per
    iteration."""
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"{where}: iterations must be an int >= 1, got {describe(iterations)}")
    if iterations < 1:
        raise ValueError(f"{where}: iterations must be >= 1, got {iterations}")
    items = [value] * iterations if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if isinstance(items, Tensor) or not isinstance(items, (list, tuple)) or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) for x in items):
        raise TypeError(f"{where}: inverse_temperature must be a number or a sequence of numbers, one per "
                        f"iteration, got {describe(value)}")
    if len(items) != iterations:
        raise ValueError(f"{where}: inverse_temperature has {len(items)} values; expected one per iteration "
                         f"({iterations})")
    if not all(0 < x < float("inf") for x in items):
        raise ValueError(f"{where}: inverse_temperature must be positive and finite, got {list(items)}")
    return [float(x) for x in items]


def check_em_options(where: str, detach_routing: bool, eps: float, variance_floor: float) -> None:
    if not isinstance(detach_routing, bool):
        raise TypeError(f"{where}: detach_routing must be a bool, got {describe(detach_routing)}")
    for name, value in (("eps", eps), ("variance_floor", variance_floor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{where}: {name} must be a positive finite number, got {describe(value)}")


def _check_em_activations_and_betas(where: str, poses: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
                                    expected_activations, out_caps: int, first: str = "poses") -> None:
    _check_floating(where, ("activations", activations), ("beta_u", beta_u), ("beta_a", beta_a))
    if tuple(activations.shape) != tuple(expected_activations):
        raise ValueError(f"{where}: activations must have shape {tuple(expected_activations)} to match {first}, "
                         f"got {describe(activations)}")
    for name, value in (("activations", activations), ("beta_u", beta_u), ("beta_a", beta_a)):
        _check_same(poses, value, name, where, first)
    for name, value in (("beta_u", beta_u), ("beta_a", beta_a)):
        if tuple(value.shape) != (out_caps,):
            raise ValueError(f"{where}: {name} must have shape (out_caps,) = ({out_caps},), got {describe(value)}")


def check_em_args(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
                  iterations: int, detach_routing: bool, coordinate_addition: bool, eps: float,
                  variance_floor: float) -> None:
    """Raise TypeError/ValueError unless this is a dense (or class-capsule) EM routing call."""
    where = "em_routing"
    _check_floating(where, ("poses", poses), ("weight", weight))
    if poses.dim() not in (4, 6) or poses.shape[2] != poses.shape[3]:
        raise ValueError(f"{where}: poses must have shape (batch, in_caps, P, P) or (batch, in_caps, P, P, height, "
                         f"width), got {describe(poses)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != tuple(poses.shape[1:4]):
        raise ValueError(f"{where}: weight must have shape (out_caps, in_caps, P, P) = (out_caps, "
                         f"{', '.join(map(str, poses.shape[1:4]))}) for poses of shape {tuple(poses.shape)}, "
                         f"got {describe(weight)}")
    if min(weight.shape) < 1 or min(poses.shape[1:]) < 1:
        raise ValueError(f"{where}: every capsule dimension must be at least 1, got poses {tuple(poses.shape)} "
                         f"and weight {tuple(weight.shape)}")
    _check_same(poses, weight, "weight", where, "poses")
    expected = (poses.shape[0], poses.shape[1], *poses.shape[4:])
    _check_em_activations_and_betas(where, poses, activations, beta_u, beta_a, expected, weight.shape[0])
    if not isinstance(coordinate_addition, bool):
        raise TypeError(f"{where}: coordinate_addition must be a bool, got {describe(coordinate_addition)}")
    if coordinate_addition and (poses.dim() != 6 or poses.shape[2] < 2):
        raise ValueError(f"{where}: coordinate_addition needs poses on a grid, (batch, in_caps, P, P, height, width) "
                         f"with P >= 2, got {describe(poses)}")
    check_em_options(where, detach_routing, eps, variance_floor)


def check_conv_em_args(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
                       iterations: int, stride, padding, dilation, normalization: str, detach_routing: bool,
                       eps: float, variance_floor: float) -> None:
    """Raise TypeError/ValueError unless this is a convolutional EM routing call (pairs already)."""
    where = "conv_em_routing"
    _check_floating(where, ("poses", poses), ("weight", weight))
    if poses.dim() != 6 or poses.shape[2] != poses.shape[3]:
        raise ValueError(f"{where}: poses must have shape (batch, in_caps, P, P, height, width), got {describe(poses)}")
    batch, in_caps, side, _, height, width = poses.shape
    if weight.dim() != 6 or weight.shape[1] != in_caps or tuple(weight.shape[4:]) != (side, side):
        raise ValueError(f"{where}: weight must have shape (out_caps, in_caps, kernel_h, kernel_w, P, P) = (out_caps, "
                         f"{in_caps}, kernel_h, kernel_w, {side}, {side}), got {describe(weight)}")
    if min(weight.shape) < 1 or min(poses.shape[1:]) < 1:
        raise ValueError(f"{where}: every capsule dimension must be at least 1, got poses {tuple(poses.shape)} "
                         f"and weight {tuple(weight.shape)}")
    _check_same(poses, weight, "weight", where, "poses")
    _check_em_activations_and_betas(where, poses, activations, beta_u, beta_a, (batch, in_caps, height, width),
                                    weight.shape[0])
    kh, kw = weight.shape[2:4]
    check_window(where, (height, width), (kh, kw), stride, padding, dilation)
    if normalization not in ("per_child", "per_window"):
        raise ValueError(f"{where}: normalization must be 'per_child' or 'per_window', got {describe(normalization)}")
    check_em_options(where, detach_routing, eps, variance_floor)


def check_em_votes_args(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
                        detach_routing: bool, eps: float, variance_floor: float) -> None:
    """Raise TypeError/ValueError unless this is EM routing from given votes."""
    where = "em_route_votes"
    _check_floating(where, ("votes", votes))
    if votes.dim() < 3 or min(votes.shape[-3:]) < 1:
        raise ValueError(f"{where}: votes must have shape (..., in_caps, out_caps, pose_entries), got "
                         f"{describe(votes)}")
    _check_em_activations_and_betas(where, votes, activations, beta_u, beta_a, votes.shape[:-2], votes.shape[-2],
                                    "votes")
    check_em_options(where, detach_routing, eps, variance_floor)


def checked_conv_em_call(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
                         iterations: int, stride, padding, dilation, inverse_temperature, normalization: str,
                         detach_routing: bool, eps: float, variance_floor: float, where: str = "conv_em_routing"):
    """A convolutional EM call's arguments checked: returns (stride, padding, dilation) as
    pairs and lambda per iteration."""
    stride, padding, dilation = (pair(stride, "stride", where), pair(padding, "padding", where),
                                 pair(dilation, "dilation", where))
    lambdas = inverse_temperatures(inverse_temperature, iterations, where)
    check_conv_em_args(poses, activations, weight, beta_u, beta_a, iterations, stride, padding, dilation,
                       normalization, detach_routing, eps, variance_floor)
    return stride, padding, dilation, lambdas
