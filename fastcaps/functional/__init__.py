"""Functional forms: routing, squash and the paper's losses.

    routing.py   dynamic_routing (validation, backend choice, the op)
    squash.py    squash with its closed-form Jacobian
    losses.py    margin_loss, reconstruction_loss
"""

from .losses import margin_loss, reconstruction_loss
from .routing import dynamic_routing
from .squash import squash

__all__ = ["dynamic_routing", "squash", "margin_loss", "reconstruction_loss"]
