"""The "cpu" backend: launchers of the fused C++ kernels (csrc/), CPU tensors only.

``extension`` loads fastcaps._C once and says why it cannot be used when it cannot;
one module per op (``dynamic_routing``) defines the kernels' schemas and launches them.
"""
