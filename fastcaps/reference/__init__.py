"""The papers' algorithms in plain PyTorch: the oracles every kernel is tested against.

One module per routing algorithm, each readable beside its paper and naive on purpose:
    dynamic_routing   Sabour, Frosst & Hinton (2017), Procedure 1
    conv_routing      the same at every position of a grid, and from given votes
    em_routing        Hinton, Sabour & Frosst (2018), EM routing between matrix capsules
"""

from .conv_routing import conv_dynamic_routing, route_conv, route_given_votes, route_votes
from .em_routing import (coordinate_offsets, conv_em_routing, em_iterations, em_route_votes, em_routing, route_conv_em,
                         route_em, window_children)
from .dynamic_routing import dynamic_routing, leaky_softmax, route, route_predictions, squash

__all__ = ["squash", "dynamic_routing", "route", "route_predictions", "leaky_softmax", "conv_dynamic_routing",
           "route_conv", "route_votes", "route_given_votes", "em_routing", "conv_em_routing", "em_route_votes",
           "em_iterations", "route_em", "route_conv_em", "coordinate_offsets", "window_children"]
