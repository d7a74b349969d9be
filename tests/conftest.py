"""Test-session setup.

Without a CUDA device the Triton kernels run under Triton's interpreter, which reads
TRITON_INTERPRET when the kernels are decorated: it is set here, before any test module
imports fastcaps (DESIGN.md section 5). The interpreter is slow, so the generic suites
leave "triton" out (each keeps its own list of backends) and tests/test_triton_kernels.py checks it at
small shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
