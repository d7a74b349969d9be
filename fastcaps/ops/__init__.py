"""The custom ops, one module per op (torch.library): schema, fake, autograd, and the kernel
of the backend a call names (fastcaps.backends.kernels).

    dynamic_routing   fastcaps::routing and fastcaps::routing_backward
    conv_routing      fastcaps::conv_routing and its backward (every backend's dense kernels on windows)
    route_votes       fastcaps::route_votes and its backward
    em_routing        fastcaps::em_routing and its backward (EM routing, votes formed in the op)
"""

from .conv_routing import conv_routing, conv_routing_backward
from .dynamic_routing import routing, routing_backward
from .em_routing import em_routing, em_routing_backward
from .route_votes import route_votes, route_votes_backward

__all__ = ["routing", "routing_backward", "conv_routing", "conv_routing_backward", "route_votes",
           "route_votes_backward", "em_routing", "em_routing_backward"]
