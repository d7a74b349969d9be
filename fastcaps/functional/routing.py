"""``fastcaps.functional.dynamic_routing``: validation, backend choice, then the op (or the
reference's loop for backend="reference")."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import ops, reference
from ..backends import resolve_backend
from ..validation import check_routing_args, renamed_detach

__all__ = ["dynamic_routing"]


def dynamic_routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    iterations: int = 3,
    detach_routing: bool = False,
    backend: str = "auto",
    *,
    leaky: bool = False,
    detach: Optional[bool] = None,
) -> Tensor:
    """Routing-by-agreement (Sabour et al. 2017, Procedure 1) from u to v.

    Args:
        u: input capsules, (B, I, Din), floating point.
        weight: (J, I, D, Din); u_hat[b, i, j] = weight[j, i] @ u[b, i].
        bias: optional (J, D), added to s_j before squash in every iteration.
        iterations: routing iterations r >= 1.
        detach_routing: stop the gradient through the routing (every iteration but the
            last runs on detached predictions and bias, so the final couplings are constants).
        backend: "auto" or one of ``fastcaps.BACKENDS``; see ``fastcaps.backends``.
        leaky: leaky routing, as the official TensorFlow code's ``_leaky_routing``: each input
            capsule's softmax over the outputs has one more, all-zero logit (an "orphan"
            parent), dropped afterwards, so c_ij = exp(b_ij) / (1 + sum_k exp(b_ik)).
        detach: the old name of ``detach_routing`` (deprecated).

    Returns:
        v: (B, J, D) in u's dtype, each capsule of length in [0, 1). Half-precision inputs
        are computed in float32 by every backend, the reference included.
    """
    detach_routing = renamed_detach(detach_routing, detach, "fastcaps.dynamic_routing")
    check_routing_args(u, weight, bias, iterations, detach_routing, leaky)
    backend = resolve_backend(backend, u.device)
    if backend == "reference":
        return reference.route(u, weight, bias, iterations, detach_routing, upcast=True, leaky=leaky)
    v, _, _ = ops.routing(u, weight, bias, iterations, detach_routing, leaky, backend)
    return v
