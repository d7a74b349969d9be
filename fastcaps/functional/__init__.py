"""Functional forms: routing, squash and the paper's losses.

    routing.py        dynamic_routing (validation, backend choice, the op)
    conv_routing.py   conv_dynamic_routing, route_votes
    squash.py    squash with its closed-form Jacobian
    losses.py    margin_loss, reconstruction_loss
"""

from .losses import margin_loss, reconstruction_loss
from .conv_routing import conv_dynamic_routing, route_votes
from .routing import dynamic_routing
from .squash import squash

__all__ = ["dynamic_routing", "conv_dynamic_routing", "route_votes", "squash", "margin_loss", "reconstruction_loss"]
