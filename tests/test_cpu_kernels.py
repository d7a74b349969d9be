"""The C++ "cpu" backend: built, registered, and deterministic across thread counts."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastcaps

pytestmark = pytest.mark.skipif(
    "cpu" not in fastcaps.available_backends("cpu"),
    reason="the C++ extension is not built (pip install --no-build-isolation -e .)",
)

# Batch 5 runs one sample per thread with 1 thread and splits samples over capsule chunks
# with 2 (csrc/routing_cpu.cpp, samples_in_parallel); batch 13 runs one sample per thread
# with both. Either way the bits must not change.
_PROGRAM = textwrap.dedent("""
    import sys, torch, fastcaps
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    outputs = []
    for batch in (5, 13):
        u = fastcaps.squash(torch.randn(batch, 301, 8, generator=g)).requires_grad_()
        w = (torch.randn(7, 301, 11, 8, generator=g) * 0.3).requires_grad_()
        b = (torch.randn(7, 11, generator=g) * 0.3).requires_grad_()
        v = fastcaps.dynamic_routing(u, w, b, 3, {detach}, backend="cpu")
        grads = torch.autograd.grad(v, (u, w, b), torch.randn(v.shape, generator=g))
        outputs += [v.detach(), *grads]
    torch.save(outputs, sys.argv[2])
""")


@pytest.mark.parametrize("detach", [False, True])
def test_bitwise_identical_with_one_and_two_threads(tmp_path, detach):
    outputs = []
    for threads in (1, 2):
        path = tmp_path / f"{threads}.pt"
        subprocess.run([sys.executable, "-c", _PROGRAM.format(detach=detach), str(threads), str(path)],
                       check=True, timeout=300)
        outputs.append(torch.load(path))
    for one, two in zip(*outputs):
        assert torch.equal(one, two)


def test_forcing_cpu_on_another_device_names_the_reason():
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run on meta: the C\\+\\+ kernels take CPU tensors"):
        fastcaps.dynamic_routing(torch.empty(2, 3, 4, device="meta"), torch.empty(5, 3, 6, 4, device="meta"),
                                 backend="cpu")


def test_auto_does_not_pick_the_untuned_cpu_kernels_yet():
    assert fastcaps.backends.resolve_backend("auto", torch.device("cpu")) == "torch"
