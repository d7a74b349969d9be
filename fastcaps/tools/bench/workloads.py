"""What ``fastcaps bench`` can time, one class per entry point: its inputs, the function each
provider runs, and its arithmetic (the floor the GFLOP/s are counted against).

    RoutingShape -> Dense   dynamic_routing (DigitCaps)
    ConvShape    -> Conv    conv_dynamic_routing (ConvCaps2d)
    VotesShape   -> Votes   route_votes
    EMShape      -> EM      conv_em_routing / em_routing (ConvMatCaps2d, ClassMatCaps)

Providers: "reference" (the reference's function, eager), "reference-compiled"
(``torch.compile`` of the same function) and the fastcaps backends; ``runs`` says which
backends have a kernel for the entry point.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor

from ... import reference
from ...backends import has_kernel
from ...cases import ConvShape, EMShape, RoutingShape, VotesShape, make_conv_inputs, make_em_inputs, make_inputs
from ...functional import conv_dynamic_routing, conv_em_routing, dynamic_routing, em_routing, route_votes

_compiled: Dict[str, Callable] = {}


def raise_recompile_limit() -> None:
    """Each benchmark point is a new static shape for the compiled reference; without this,
    dynamo stops compiling after 8 shapes and silently runs eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))


def _compiled_once(name: str, function: Callable) -> Callable:
    if name not in _compiled:
        raise_recompile_limit()
        _compiled[name] = torch.compile(function, dynamic=False, fullgraph=True)
    return _compiled[name]


def routing_flops(rows: int, children: int, out_caps: int, out_dim: int, in_dim: int, iterations: int,
                  mode: str) -> float:
    """DESIGN.md section 6, for ``rows`` routings over ``children`` capsules each: the votes once
    (2 I J D Din; none when in_dim is 0, votes given) and the routing passes (2 (2r - 1) I J D).
    Forward+backward counts three times the forward, the usual convention for a layer whose
    backward does two products per forward product."""
    per_row = 2 * children * out_caps * out_dim * in_dim + 2 * (2 * iterations - 1) * children * out_caps * out_dim
    return rows * per_row * (3 if mode == "forward+backward" else 1)


class Dense:
    def flops(self, shape: RoutingShape, iterations: int, mode: str) -> float:
        return routing_flops(shape.batch, shape.in_caps, shape.out_caps, shape.out_dim, shape.in_dim, iterations,
                             mode)

    def inputs(self, shape: RoutingShape, seed: int, dtype: torch.dtype, device: str) -> List[Tensor]:
        """u like squashed primary capsules, weight at DigitCaps' initialisation scale."""
        made = make_inputs(shape, seed, init="digitcaps", dtype=dtype, device=device)
        return [made.u, made.weight]

    def route(self, provider: str, shape: RoutingShape) -> Callable:
        if provider == "reference":
            return lambda u, weight, r: reference.route(u, weight, None, r, False)
        if provider == "reference-compiled":
            compiled = _compiled_once("dense", reference.route)
            return lambda u, weight, r: compiled(u, weight, None, r, False)
        return lambda u, weight, r: dynamic_routing(u, weight, None, r, False, backend=provider)

    def runs(self, backend: str) -> bool:
        return True

    def describe(self, shape: RoutingShape) -> str:
        return shape.capsules


class Conv:
    def flops(self, shape: ConvShape, iterations: int, mode: str) -> float:
        rows = shape.batch * shape.out_grid[0] * shape.out_grid[1]
        return routing_flops(rows, shape.children, shape.out_caps, shape.out_dim, shape.in_dim, iterations, mode)

    def inputs(self, shape: ConvShape, seed: int, dtype: torch.dtype, device: str) -> List[Tensor]:
        made = make_conv_inputs(shape, seed, init="digitcaps", dtype=dtype, device=device)
        return [made.u, made.weight]

    def route(self, provider: str, shape: ConvShape) -> Callable:
        geometry = (shape.stride, shape.padding, shape.dilation)
        if provider == "reference":
            return lambda u, weight, r: reference.route_conv(u, weight, None, r, *geometry)
        if provider == "reference-compiled":
            compiled = _compiled_once("conv", reference.route_conv)
            return lambda u, weight, r: compiled(u, weight, None, r, *geometry)
        return lambda u, weight, r: conv_dynamic_routing(u, weight, None, r, *geometry, backend=provider)

    def runs(self, backend: str) -> bool:
        return True

    def describe(self, shape: ConvShape) -> str:
        k, s, p = shape.kernel, shape.stride, shape.padding
        return (f"{shape.in_caps}x{shape.in_dim} on {shape.height}x{shape.width} -> {shape.out_caps}x{shape.out_dim}, "
                f"K{k[0]}x{k[1]} s{s[0]} p{p[0]}")


class Votes:
    def flops(self, shape: VotesShape, iterations: int, mode: str) -> float:
        return routing_flops(shape.batch * shape.positions, shape.in_caps, shape.out_caps, shape.out_dim, 0,
                             iterations, mode)

    def inputs(self, shape: VotesShape, seed: int, dtype: torch.dtype, device: str) -> List[Tensor]:
        """Votes of length about 1, as a layer's predictions start."""
        generator = torch.Generator().manual_seed(seed)
        votes = torch.randn(*shape.votes_shape, generator=generator) / shape.out_dim ** 0.5
        return [votes.to(device=device, dtype=dtype)]

    def route(self, provider: str, shape: VotesShape) -> Callable:
        if provider == "reference":
            return lambda votes, r: reference.route_given_votes(votes, None, r)
        if provider == "reference-compiled":
            compiled = _compiled_once("votes", reference.route_given_votes)
            return lambda votes, r: compiled(votes, None, r)
        return lambda votes, r: route_votes(votes, None, r, backend=provider)

    def runs(self, backend: str) -> bool:
        return has_kernel(backend, "route_votes")

    def describe(self, shape: VotesShape) -> str:
        return f"{shape.positions} x {shape.in_caps} -> {shape.out_caps}x{shape.out_dim} votes"


class EM:
    """EM routing, lambda 0.01 per iteration. Its arithmetic per routing (window): the votes once
    (2 C J P^3), and per iteration an M-step (about 5 C J P^2: r, the weighted mean, the
    weighted variance) and, but the last, an E-step (about 4 C J P^2: the log-densities)."""

    def flops(self, shape: EMShape, iterations: int, mode: str) -> float:
        entries = shape.pose * shape.pose
        per_vote = 2 * shape.pose ** 3 + 5 * iterations * entries + 4 * (iterations - 1) * entries
        total = shape.batch * shape.windows * shape.children * shape.out_caps * per_vote
        return total * (3 if mode == "forward+backward" else 1)

    def inputs(self, shape: EMShape, seed: int, dtype: torch.dtype, device: str) -> List[Tensor]:
        return make_em_inputs(shape, seed, dtype, device)

    def route(self, provider: str, shape: EMShape) -> Callable:
        def lambdas(r):
            return [0.01] * r

        def combined(out):
            # One tensor for the engine's backward: poses and activations, each sample's sum.
            return out[0].flatten(1).sum(1) + out[1].flatten(1).sum(1)

        if shape.conv:
            geometry = (shape.stride, shape.padding, shape.dilation)
            if provider in ("reference", "reference-compiled"):
                function = reference.route_conv_em if provider == "reference" else _compiled_once(
                    "em-conv", reference.route_conv_em)
                return lambda *t: combined(function(*t[:5], lambdas(t[5]), *geometry, shape.normalization))
            return lambda *t: combined(conv_em_routing(*t[:5], t[5], *geometry, lambdas(t[5]), shape.normalization,
                                                       backend=provider))
        if provider in ("reference", "reference-compiled"):
            function = reference.route_em if provider == "reference" else _compiled_once("em-class", reference.route_em)
            return lambda *t: combined(function(*t[:5], lambdas(t[5]), False, shape.coordinate_addition))
        return lambda *t: combined(em_routing(*t[:5], t[5], lambdas(t[5]), False, shape.coordinate_addition,
                                              backend=provider))

    def runs(self, backend: str) -> bool:
        return has_kernel(backend, "em_routing")

    def describe(self, shape: EMShape) -> str:
        return f"{shape} EM"


SHAPES = {"RoutingShape": RoutingShape, "ConvShape": ConvShape, "VotesShape": VotesShape, "EMShape": EMShape}
_WORKLOADS = {RoutingShape: Dense(), ConvShape: Conv(), VotesShape: Votes(), EMShape: EM()}


def workload(shape):
    """The workload of a shape record."""
    return _WORKLOADS[type(shape)]


def provider_runs(provider: str, shape) -> bool:
    return provider == "reference-compiled" or workload(shape).runs(provider)
