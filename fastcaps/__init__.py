"""fastcaps: capsule-network routing without materializing u_hat.

    import fastcaps
    caps = fastcaps.DigitCaps(in_caps=1152, in_dim=8, out_caps=10, out_dim=16)
    v = caps(u)                                   # (B, 10, 16)
    fastcaps.available_backends("cpu")            # ['reference', 'torch', ...]

The layers of the package (docs/architecture.md): ``reference`` (the papers' algorithms),
``kernels`` (each backend's kernels), ``ops`` (the custom ops), ``functional`` and ``nn``
(the public API), ``backends`` (the registry), ``tools`` (check, bench, train, AOT).
"""

from .kernels.cpu import extension as _extension  # noqa: F401  (loads the C++ kernels, or warns once)
from . import functional, nn, ops, reference
from .backends import BACKENDS, available_backends
from .functional import (conv_dynamic_routing, conv_em_routing, dynamic_routing, em_route_votes, em_routing, margin_loss,
                         reconstruction_loss, route_votes, spread_loss, squash)
from .nn import (CapsNet, CapsNetOutput, CapsuleLoss, ClassMatCaps, ConvCaps2d, ConvMatCaps2d, Decoder, DigitCaps,
                 MarginLoss, MatrixCapsNet, MatrixCapsNetOutput, PrimaryCaps, PrimaryMatCaps, SpreadLoss, convert_weight)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "dynamic_routing",
    "conv_dynamic_routing",
    "route_votes",
    "squash",
    "margin_loss",
    "reconstruction_loss",
    "DigitCaps",
    "PrimaryCaps",
    "ConvCaps2d",
    "Decoder",
    "CapsNet",
    "CapsNetOutput",
    "MarginLoss",
    "CapsuleLoss",
    "convert_weight",
    "em_routing",
    "conv_em_routing",
    "em_route_votes",
    "spread_loss",
    "PrimaryMatCaps",
    "ConvMatCaps2d",
    "ClassMatCaps",
    "MatrixCapsNet",
    "MatrixCapsNetOutput",
    "SpreadLoss",
    "functional",
    "nn",
    "ops",
    "reference",
]
