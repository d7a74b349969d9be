"""The "torch" backend: DESIGN.md sections 2-3 in vectorized PyTorch, the executable spec
that the C++ and Triton kernels port. Any device, any floating dtype."""
