"""The "triton" backend: fused Triton kernels and their launchers, on CUDA tensors (or on CPU
tensors under the Triton interpreter, for validation).

    routing_jit.py       the @triton.jit kernels of dynamic routing
    configs.py           their launch configurations, keyed on shapes only
    dynamic_routing.py   the launchers (the contract of fastcaps/kernels/__init__.py)

This package's __init__ imports nothing: triton is imported when the kernels are first
needed (fastcaps.backends probes it once).
"""
