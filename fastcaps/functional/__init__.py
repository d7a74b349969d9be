"""Functional forms: routing, squash and the paper's losses.

    routing.py        dynamic_routing (validation, backend choice, the op)
    conv_routing.py   conv_dynamic_routing, route_votes
    em_routing.py     em_routing, conv_em_routing, em_route_votes (matrix capsules)
    squash.py    squash with its closed-form Jacobian
    losses.py    margin_loss, reconstruction_loss, spread_loss
"""

from .em_routing import conv_em_routing, em_route_votes, em_routing
from .losses import margin_loss, reconstruction_loss, spread_loss
from .conv_routing import conv_dynamic_routing, route_votes
from .routing import dynamic_routing
from .squash import squash

__all__ = ["dynamic_routing", "conv_dynamic_routing", "route_votes", "squash", "margin_loss", "reconstruction_loss",
           "em_routing", "conv_em_routing", "em_route_votes", "spread_loss"]
