"""The custom ops, one module per op (torch.library): schema, fake, autograd, and the kernel
of the backend a call names (fastcaps.backends.kernels).

    dynamic_routing   fastcaps::routing and fastcaps::routing_backward
"""

from .dynamic_routing import routing, routing_backward

__all__ = ["routing", "routing_backward"]
