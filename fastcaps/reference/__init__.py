"""The papers' algorithms in plain PyTorch: the oracles every kernel is tested against.

One module per routing algorithm, each readable beside its paper and naive on purpose:
    dynamic_routing   Sabour, Frosst & Hinton (2017), Procedure 1
"""

from .dynamic_routing import dynamic_routing, route, squash

__all__ = ["squash", "dynamic_routing", "route"]
