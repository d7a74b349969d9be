"""The EM-routing rows of ``fastcaps check``: every backend with an EM kernel against the
reference in float64, values and the gradients of poses, activations, W, beta_u and beta_a.

Errors are normwise, as for dynamic routing. In float32 a row passes within 1e-4, or within
twice the reference's own float32 error where that is larger: the gradients of beta_u and
beta_a sum terms of both signs over every window and lose digits in float32 whatever computes
them (docs/em.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..backends import has_kernel
from ..cases import EMShape, make_em_inputs
from ..functional import conv_em_routing, em_routing
from .tables import format_table

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
NAMES = ("poses", "activations", "grad poses", "grad activations", "grad W", "grad beta_u", "grad beta_a")

# Odd sizes: stride 2 with padding, a rectangular dilated window with asymmetric stride and
# padding, K = 1, a window over the whole grid, per-window normalisation, the class layer with
# coordinate addition, a dense layer.
EM_SHAPES = [
    EMShape(2, 3, 4, (6, 5), 4, (3, 3), (2, 2), (1, 1)),
    EMShape(2, 3, 4, (6, 5), 4, (3, 3), (2, 2), (1, 1), normalization="per_window"),
    EMShape(1, 2, 3, (5, 7), 3, (2, 3), (1, 2), (0, 1), (2, 1)),
    EMShape(3, 1, 2, (4, 4), 2, (1, 1)),
    EMShape(1, 2, 5, (3, 3), 4, (3, 3)),
    EMShape(2, 3, 5, (3, 2), 4, coordinate_addition=True),
    EMShape(3, 7, 3, (), 4),
]


@dataclass(frozen=True)
class EMCase:
    shape: EMShape
    iterations: int
    detach_routing: bool

    @property
    def options(self) -> str:
        return f"r={self.iterations}{' detach' if self.detach_routing else ''}"


@dataclass
class EMRow:
    backend: str
    case: EMCase
    dtype: torch.dtype
    errors: List[float]       # per NAMES
    allowed: List[float]

    @property
    def passed(self) -> bool:
        return all(e <= a for e, a in zip(self.errors, self.allowed))  # "<=": a NaN fails


def em_cases(shapes: Sequence[EMShape] = EM_SHAPES) -> List[EMCase]:
    return [EMCase(shape, r, detach) for shape in shapes for r, detach in itertools.product((1, 2, 3), (False, True))]


def _lambdas(iterations: int) -> List[float]:
    return [0.5 * (t + 1) for t in range(iterations)]


def _call(case: EMCase, tensors, backend: str):
    shape, lambdas = case.shape, _lambdas(case.iterations)
    if shape.conv:
        return conv_em_routing(*tensors, case.iterations, shape.stride, shape.padding, shape.dilation, lambdas,
                               shape.normalization, case.detach_routing, backend=backend)
    return em_routing(*tensors, case.iterations, lambdas, case.detach_routing, shape.coordinate_addition,
                      backend=backend)


def values_and_gradients(case: EMCase, inputs, dtype: torch.dtype, backend: str, cotangents) -> List[torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outputs = _call(case, leaves, backend)
    grads = torch.autograd.grad(sum((x * c.to(dtype)).sum() for x, c in zip(outputs, cotangents)), leaves)
    return [t.detach().double() for t in (*outputs, *grads)]


def _error(value: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    difference = (value - expected).abs().max().item() if value.numel() else 0.0
    return difference / scale if scale > 0 else difference


def run_em(backends: Sequence[str], dtypes: Sequence[torch.dtype], cases: Optional[Sequence[EMCase]] = None,
           seed: int = 0) -> List[EMRow]:
    """Every backend with an EM kernel x case x dtype, against the reference in float64."""
    rows = []
    for index, case in enumerate(em_cases() if cases is None else cases):
        inputs = make_em_inputs(case.shape, seed + index)
        generator = torch.Generator().manual_seed(seed + index + 1000)
        with torch.no_grad():
            shapes = [x.shape for x in _call(case, inputs, "reference")]
        cotangents = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        oracle = values_and_gradients(case, inputs, torch.float64, "reference", cotangents)
        for dtype in dtypes:
            same_dtype = (oracle if dtype == torch.float64
                          else values_and_gradients(case, inputs, dtype, "reference", cotangents))
            own = [max(TOLERANCE[dtype], 2 * _error(x, y)) if dtype != torch.float64 else TOLERANCE[dtype]
                   for x, y in zip(same_dtype, oracle)]
            for backend in backends:
                if backend == "reference" or not has_kernel(backend, "em_routing"):
                    continue
                got = values_and_gradients(case, inputs, dtype, backend, cotangents)
                rows.append(EMRow(backend, case, dtype, [_error(x, y) for x, y in zip(got, oracle)], own))
    return rows


def summary(rows: List[EMRow]) -> str:
    """One line per (backend, shape, dtype): the worst error of each tensor over the options."""
    groups = {}
    for row in rows:
        groups.setdefault((row.backend, str(row.case.shape), row.dtype), []).append(row)
    lines = []
    for (backend, shape, dtype), group in groups.items():
        worst = [max(row.errors[k] for row in group) for k in range(len(NAMES))]
        lines.append([backend, shape, str(dtype).replace("torch.", ""), str(len(group)),
                      *(f"{e:.1e}" for e in worst), "pass" if all(r.passed for r in group) else "FAIL"])
    header = ("backend", "EM call", "dtype", "cases", "poses", "acts", "g poses", "g acts", "g W", "g beta_u",
              "g beta_a", "result")
    return format_table(lines, header)
