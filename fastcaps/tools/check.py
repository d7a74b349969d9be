"""Correctness check of every routing backend against the reference: ``fastcaps check``.

For each case (shape, iterations, detach, bias, leaky) and dtype, a backend runs forward and
backward on fresh random inputs and is compared with the oracle, the reference evaluated
in float64. Errors are normwise: max|x - x_ref| / max|x_ref| per tensor, for v and the
gradients of u, weight and bias (for routing from given votes, ``route_votes``: of the votes,
in the "grad u" column, and bias). A backend with no kernel for an entry point is skipped
there, and the summary says so. EM routing (``fastcaps::em_routing``) has its own rows
(check_em.py): poses, activations and the gradients of poses, activations, W, beta_u, beta_a. Every float64 row also checks the backend's gradients
against a central finite difference of its own forward along a random direction, which
does not depend on the reference (so the reference's float64 row tests something too).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import reference
from ..backends import BACKENDS, checked_by_default, has_kernel
from ..cases import ConvShape, RoutingShape, VotesShape, make_conv_inputs, make_inputs, make_votes_inputs
from ..functional import conv_dynamic_routing, dynamic_routing, route_votes
from . import check_em
from .tables import format_table

# Normwise relative tolerance per dtype, for v and every gradient.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# The finite-difference check is limited by its step, not by the kernel.
FD_TOLERANCE = 1e-6
_FD_STEP = 1e-6


@dataclass(frozen=True)
class Case:
    shape: Union[RoutingShape, ConvShape, VotesShape]  # ConvShape: conv_dynamic_routing; VotesShape: route_votes
    iterations: int
    detach_routing: bool
    bias: bool
    leaky: bool = False

    @property
    def options(self) -> str:
        return (f"r={self.iterations}{' detach' if self.detach_routing else ''}{' bias' if self.bias else ''}"
                f"{' leaky' if self.leaky else ''}")


@dataclass
class Row:
    backend: str
    case: Case
    dtype: torch.dtype
    error_v: float
    error_grad_u: float
    error_grad_weight: Optional[float]  # None for route_votes (no weight)
    error_grad_bias: Optional[float]  # None without a bias
    error_fd: Optional[float]  # float64 rows only

    @property
    def passed(self) -> bool:
        tolerance = TOLERANCE[self.dtype]
        errors = [self.error_v, self.error_grad_u, self.error_grad_weight, self.error_grad_bias]
        # Written as "<=" so that a NaN error fails.
        within = all(e <= tolerance for e in errors if e is not None)
        return within and (self.error_fd is None or self.error_fd <= FD_TOLERANCE)


# Leaky routing with a few of the other options, not all twelve: it changes only the softmax.
_LEAKY_OPTIONS = ((1, False, True), (3, False, False), (3, True, True))


def _options(shapes: Iterable[RoutingShape]) -> List[Case]:
    cases = []
    for shape in shapes:
        cases += [Case(shape, r, detach_routing, bias)
                  for r, detach_routing, bias in itertools.product((1, 2, 3), (False, True), (False, True))]
        cases += [Case(shape, r, detach_routing, bias, leaky=True) for r, detach_routing, bias in _LEAKY_OPTIONS]
    return cases


# Convolutional layers at odd sizes: stride 2, padding, K = 1, a rectangular dilated window,
# and a window over the whole grid (DigitCaps as a convolution).
CONV_SHAPES = [ConvShape(2, 3, 4, 7, 6, 4, 5, (3, 3), (2, 2), (1, 1)), ConvShape(3, 2, 3, 5, 5, 3, 4, (1, 1)),
               ConvShape(1, 3, 2, 6, 7, 2, 3, (2, 3), (1, 2), (0, 1), (2, 1)), ConvShape(2, 2, 3, 4, 4, 3, 5, (4, 4))]


# Routing from given votes: one capsule of each kind, odd sizes, and a conv layer's window.
VOTES_SHAPES = [VotesShape(1, 1, 1, 1, 1), VotesShape(2, 3, 7, 3, 5), VotesShape(1, 4, 72, 8, 16)]


def default_cases() -> List[Case]:
    """MNIST DigitCaps at a small batch, odd shapes, convolutional layers (CONV_SHAPES) and
    routing from given votes (VOTES_SHAPES), with every routing option."""
    shapes = [RoutingShape(5, 1152, 8, 10, 16), RoutingShape(1, 1, 1, 1, 1), RoutingShape(3, 7, 3, 3, 5),
              RoutingShape(17, 7, 8, 10, 16), RoutingShape(2, 33, 4, 4, 12)]
    return _options(shapes + CONV_SHAPES + VOTES_SHAPES)


def small_cases() -> List[Case]:
    """The default cases without the MNIST shape: for slow backends (the Triton interpreter)."""
    return [case for case in default_cases() if case.shape.in_caps < 1152]


def full_cases() -> List[Case]:
    """B in {1, 3, 17} x I in {1, 7, 1152} x J in {1, 3, 10}, MNIST capsule dims, every option."""
    shapes = [RoutingShape(b, i, 8, j, 16) for b in (1, 3, 17) for i in (1, 7, 1152) for j in (1, 3, 10)]
    return _options(shapes)


def case_inputs(case: Case, seed: int):
    """float64 (u, weight, bias or None, grad_v) with routing far from uniform couplings
    (route_votes: u holds the votes and weight is None)."""
    make = {ConvShape: make_conv_inputs, VotesShape: make_votes_inputs}.get(type(case.shape), make_inputs)
    return make(case.shape, seed, bias=case.bias)


def op_of(case: Case) -> str:
    """The op a case's entry point runs on (what a backend needs a kernel for)."""
    return "route_votes" if isinstance(case.shape, VotesShape) else "dynamic_routing"


def _forward_backward(route: Callable, u, weight, bias, grad_v, dtype):
    """[v, grad u, grad weight, grad bias], None where an input is absent."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (u, weight, bias)]
    v = route(*leaves)
    grads = iter(torch.autograd.grad(v, [t for t in leaves if t is not None], grad_v.to(dtype)))
    return [v.detach().double()] + [None if t is None else next(grads).double() for t in leaves]


def normwise_error(value: Tensor, expected: Tensor) -> float:
    """max|value - expected| / max|expected| (the difference itself where expected is 0)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if value.numel() == 0:
        return 0.0
    difference = (value - expected).abs().max().item()
    return difference / scale if scale > 0 else difference


def _finite_difference_error(route: Callable, case: Case, u, weight, bias, grad_v, grads,
                             seed: int) -> Optional[float]:
    """|(L(x + h d) - L(x - h d)) / 2h - <grad L, d>| / |<grad L, d>| for L = <grad_v, v>.

    With ``detach_routing`` the gradient is, by definition, that of the last iteration with
    its couplings c_r held constant, so L is differentiated through that frozen forward.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = [u, weight, bias]
    directions = [None if t is None else torch.randn(t.shape, generator=generator, dtype=torch.float64)
                  for t in inputs]
    if case.detach_routing and case.iterations > 1:
        if not isinstance(case.shape, RoutingShape):
            return None  # the frozen forward below is the dense one; the oracle still checks these rows
        _, couplings = reference.route(u, weight, bias, case.iterations, True, return_couplings=True,
                                       leaky=case.leaky)
        frozen = couplings[-1]

        def route(u_, w_, b_):  # noqa: F811  (the frozen forward replaces the backend's)
            s = torch.einsum("bij,bijd->bjd", frozen, torch.einsum("jide,bie->bijd", w_, u_))
            return reference.squash(s if b_ is None else s + b_)

    def loss(step):
        moved = [None if t is None else t + step * d for t, d in zip(inputs, directions)]
        with torch.no_grad():
            v = route(*moved)
        return (v * grad_v).sum().item()

    numeric = (loss(_FD_STEP) - loss(-_FD_STEP)) / (2 * _FD_STEP)
    analytic = sum((g * d).sum().item() for g, d in zip(grads, directions) if g is not None)
    return abs(numeric - analytic) / max(abs(analytic), 1e-12)


def _router(backend: str, case: Case, device: str = "cpu") -> Callable:
    """Routing on ``device`` from CPU tensors and back: gradients reach the CPU leaves."""

    shape = case.shape

    def route(u, w, b):
        u, w, b = (None if t is None else t.to(device) for t in (u, w, b))
        if isinstance(shape, VotesShape):
            return route_votes(u, b, case.iterations, case.detach_routing, case.leaky, backend).cpu()
        if isinstance(shape, ConvShape):
            return conv_dynamic_routing(u, w, b, case.iterations, shape.stride, shape.padding, shape.dilation,
                                        case.detach_routing, case.leaky, backend).cpu()
        return dynamic_routing(u, w, b, case.iterations, case.detach_routing, backend=backend,
                               leaky=case.leaky).cpu()

    return route


def oracle_for(case: Case, seed: int) -> List[Tensor]:
    """[v, grad u, grad weight, (grad bias)] of the reference in float64."""
    return _forward_backward(_router("reference", case), *case_inputs(case, seed), torch.float64)


def check_case(backend: str, case: Case, dtype: torch.dtype, seed: int = 0, oracle=None,
               device: str = "cpu") -> Row:
    """Compare ``backend`` at ``dtype`` on ``device`` with the float64 reference (CPU) on one case."""
    u, weight, bias, grad_v = case_inputs(case, seed)
    if oracle is None:
        oracle = oracle_for(case, seed)
    route = _router(backend, case, device)
    results = _forward_backward(route, u, weight, bias, grad_v, dtype)
    errors = [None if x is None else normwise_error(x, y) for x, y in zip(results, oracle)]
    fd = None
    if dtype == torch.float64:
        fd = _finite_difference_error(route, case, u, weight, bias, grad_v, results[1:], seed)
    return Row(backend, case, dtype, errors[0], errors[1], errors[2],
               errors[3] if case.bias else None, fd)


def half_check(backend: str, shape: RoutingShape, dtype: torch.dtype, device: str = "cpu", seed: int = 7,
               iterations: int = 3) -> dict:
    """float16 or bfloat16 inputs, computed in float32 by the kernels: elementwise
    |kernel - ref64| <= 2 |ref_low - ref64| + 1e-2 max|ref64| for v and every gradient, where
    ref64 is the reference in float64 on the float64 inputs and ref_low the reference computed
    in ``dtype`` itself; outputs and gradients keep the input dtypes. Returns
    {"passed", "dtypes_kept", "error", "error_same_dtype"} (normwise errors, worst tensor)."""
    u, weight, bias, grad_v = make_inputs(shape, seed, bias=True)
    exact = [t.detach().clone().requires_grad_() for t in (u, weight, bias)]
    low = [t.detach().to(dtype).requires_grad_() for t in (u, weight, bias)]
    on_device = [t.detach().to(dtype).to(device).requires_grad_() for t in (u, weight, bias)]
    results, dtypes_kept = [], True
    routes = ((exact, "reference"), (low, "reference"), (on_device, backend))
    for leaves, name in routes:
        v = dynamic_routing(*leaves, iterations=iterations, backend=name)
        grads = torch.autograd.grad(v, leaves, grad_v.to(v.dtype).to(v.device))
        dtypes_kept &= v.dtype == leaves[0].dtype and all(g.dtype == x.dtype for g, x in zip(grads, leaves))
        results.append([t.detach().double().cpu() for t in (v, *grads)])
    within = all(bool(torch.all((kernel - ref64).abs() <= 2 * (ref_low - ref64).abs() + 1e-2 * ref64.abs().max()))
                 for ref64, ref_low, kernel in zip(*results))
    return {"passed": within and bool(dtypes_kept), "dtypes_kept": bool(dtypes_kept),
            "error": max(normwise_error(k, r) for r, k in zip(results[0], results[2])),
            "error_same_dtype": max(normwise_error(l, r) for r, l in zip(results[0], results[1]))}


def run(
    backends: Sequence[str],
    cases: Iterable[Case],
    dtypes: Sequence[torch.dtype],
    seed: int = 0,
    on_row: Optional[Callable[[Row], None]] = None,
    device: str = "cpu",
) -> List[Row]:
    """Every backend x case x dtype on ``device``; the float64 oracle (CPU) is computed once per
    case. A backend with no kernel for a case's op (``has_kernel``) is skipped there."""
    rows = []
    for index, case in enumerate(cases):
        oracle = oracle_for(case, seed + index)
        for backend, dtype in itertools.product(backends, dtypes):
            if not has_kernel(backend, op_of(case)):
                continue
            row = check_case(backend, case, dtype, seed + index, oracle, device)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def format_error(error: Optional[float]) -> str:
    return "-" if error is None else f"{error:.1e}"


HEADER = ("backend", "shape", "options", "dtype", "v", "grad u", "grad W", "grad b", "fd", "result")


def format_row(row: Row) -> List[str]:
    return [
        row.backend, str(row.case.shape), row.case.options, str(row.dtype).replace("torch.", ""),
        format_error(row.error_v), format_error(row.error_grad_u), format_error(row.error_grad_weight),
        format_error(row.error_grad_bias), format_error(row.error_fd), "pass" if row.passed else "FAIL",
    ]


# --- the command ------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SUMMARY_HEADER = ("backend", "shape", "dtype", "cases", "max err v", "grad u", "grad W", "grad b", "fd", "result")


def _summary(rows: List[Row]) -> List[List[str]]:
    """One line per (backend, shape, dtype): the worst error over all routing options."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row.backend, str(row.case.shape), row.dtype)].append(row)

    def worst(values):
        present = [v for v in values if v is not None]
        return max(present) if present else None

    lines = []
    for (backend, shape, dtype), group in groups.items():
        lines.append([
            backend, shape, str(dtype).replace("torch.", ""), str(len(group)),
            *(format_error(worst(getattr(r, name) for r in group))
              for name in ("error_v", "error_grad_u", "error_grad_weight", "error_grad_bias", "error_fd")),
            "pass" if all(r.passed for r in group) else "FAIL",
        ])
    return lines


def check_command(args: argparse.Namespace) -> int:
    backends = args.backend or checked_by_default(args.device)
    dtypes = [_DTYPES[name] for name in (args.dtype or list(_DTYPES))]
    cases = full_cases() if args.full else small_cases() if args.small else default_cases()
    print(
        f"fastcaps check: {len(cases)} cases x {len(dtypes)} dtypes, backends {', '.join(backends)}; "
        "oracle: the reference in float64 (errors are max|x - ref| / max|ref|)",
        flush=True,
    )
    started = time.perf_counter()
    rows = run(backends, cases, dtypes, seed=args.seed, device=args.device)
    if args.verbose:
        print(format_table([format_row(row) for row in rows], HEADER))
    else:
        print(format_table(_summary(rows), _SUMMARY_HEADER))
    em_rows = check_em.run_em(backends, dtypes, seed=args.seed) if args.device == "cpu" else []
    if em_rows:
        print("\nEM routing (fastcaps::em_routing), errors against the reference in float64:")
        print(check_em.summary(em_rows))
    failed = [row for row in rows if not row.passed]
    failed_em = [row for row in em_rows if not row.passed]
    tolerances = ", ".join(f"{str(d).replace('torch.', '')} {t:g}" for d, t in TOLERANCE.items())
    total, bad = len(rows) + len(em_rows), len(failed) + len(failed_em)
    print(
        f"\n{total - bad} passed, {bad} failed in {time.perf_counter() - started:.1f} s "
        f"(tolerance: {tolerances}; finite difference {FD_TOLERANCE:g}; EM float32: or twice the reference's own "
        "float32 error)"
    )
    for row in failed:
        print("FAILED: " + "  ".join(format_row(row)))
    for row in failed_em:
        print(f"FAILED: {row.backend}  EM {row.case.shape}  {row.case.options}  {row.dtype}  "
              + "  ".join(f"{name} {e:.1e} > {a:.1e}" for name, e, a in zip(check_em.NAMES, row.errors, row.allowed)
                          if not e <= a))
    for op in sorted({op_of(case) for case in cases} | {"em_routing"}):
        lacking = [backend for backend in backends if not has_kernel(backend, op)]
        if lacking:
            print(f"not checked: {op} on {', '.join(lacking)} (no kernel for it yet)")
    return 1 if failed or failed_em else 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "check", help="compare every available backend with the reference, values and gradients",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="backend to check (repeatable; default: every one available on the device, but "
                             "the Triton interpreter on CPU, which is checked when named)")
    parser.add_argument("--device", default="cpu", help="device of the inputs, e.g. cpu or cuda")
    parser.add_argument("--dtype", action="append", choices=list(_DTYPES),
                        help="dtype to check (repeatable; default: float32 and float64)")
    parser.add_argument("--full", action="store_true",
                        help="the full grid: B in {1,3,17} x I in {1,7,1152} x J in {1,3,10}")
    parser.add_argument("--small", action="store_true",
                        help="the default cases without the MNIST shape (for the Triton interpreter)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per case")
    parser.set_defaults(run=check_command)
