"""The C++ "cpu" backend: built, registered, correct and deterministic across thread counts
in every instruction-set build this CPU runs (FASTCAPS_CPU_ISA forces one)."""

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcaps
from fastcaps.kernels.cpu import extension

pytestmark = pytest.mark.skipif(
    "cpu" not in fastcaps.available_backends("cpu"),
    reason="the C++ extension is not built (pip install --no-build-isolation -e .)",
)

# Every build this CPU runs: AVX-512 where there is AVX-512, AVX2, and the baseline everywhere.
BUILDS = extension.runnable_isas()


def _with_build(isa: str) -> dict:
    return dict(os.environ, FASTCAPS_CPU_ISA=isa)


# Batch 5 runs one sample per thread with 1 thread and splits samples over capsule chunks
# with 2 (csrc/dynamic_routing/layout.h, samples_in_parallel); batch 13 runs one sample per thread
# with both; batches 1 and 4 keep the forward's u_hat for the backward (1 also takes grad W
# from W's own layout). Either way the bits must not change.
_PROGRAM = textwrap.dedent("""
    import sys, torch, fastcaps
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    outputs = []
    for batch in (1, 4, 5, 13):
        u = fastcaps.squash(torch.randn(batch, 301, 8, generator=g)).requires_grad_()
        w = (torch.randn(7, 301, 11, 8, generator=g) * 0.3).requires_grad_()
        b = (torch.randn(7, 11, generator=g) * 0.3).requires_grad_()
        v = fastcaps.dynamic_routing(u, w, b, 3, {detach}, backend="cpu")
        grads = torch.autograd.grad(v, (u, w, b), torch.randn(v.shape, generator=g))
        outputs += [v.detach(), *grads]
    torch.save(outputs, sys.argv[2])
""")


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("detach", [False, True])
def test_bitwise_identical_with_one_and_two_threads(tmp_path, detach, isa):
    outputs = []
    for threads in (1, 2):
        path = tmp_path / f"{threads}.pt"
        subprocess.run([sys.executable, "-c", _PROGRAM.format(detach=detach), str(threads), str(path)],
                       check=True, timeout=300, env=_with_build(isa))
        outputs.append(torch.load(path))
    for one, two in zip(*outputs):
        assert torch.equal(one, two)


@pytest.mark.parametrize("isa", BUILDS)
def test_every_build_passes_the_check(isa):
    """fastcaps check's default cases, float32 and float64, values and gradients against the
    float64 reference and finite differences, with each build forced."""
    result = subprocess.run([sys.executable, "-m", "fastcaps", "check", "--backend", "cpu"], capture_output=True,
                            text=True, timeout=600, env=_with_build(isa))
    assert result.returncode == 0 and " 0 failed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_default_build_is_the_widest_the_cpu_runs():
    assert extension.isa() == BUILDS[0] and BUILDS[-1] == "baseline"
    if platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert BUILDS[0] == "avx2"


@pytest.mark.parametrize("forced, message", [
    ("bogus", "FASTCAPS_CPU_ISA=bogus is not a build of fastcaps' C++ kernels; expected one of"),
    ("unrunnable", "this CPU cannot run the"),
])
def test_forcing_a_build_that_cannot_run_warns_and_leaves_the_other_backends(forced, message):
    if forced == "unrunnable":
        missing = [isa for isa in ("avx512", "avx2") if isa not in BUILDS and platform.machine() == "x86_64"]
        if not missing:
            pytest.skip("this CPU runs every build")
        forced = missing[0]
    program = ("import warnings, fastcaps\n"
               "print(fastcaps.available_backends('cpu'))\n")
    result = subprocess.run([sys.executable, "-W", "always", "-c", program], capture_output=True, text=True,
                            timeout=300, env=_with_build(forced))
    assert result.returncode == 0, result.stderr
    assert "'cpu'" not in result.stdout and message in result.stderr


def test_forcing_cpu_on_another_device_names_the_reason():
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run on meta: the C\\+\\+ kernels take CPU tensors"):
        fastcaps.dynamic_routing(torch.empty(2, 3, 4, device="meta"), torch.empty(5, 3, 6, 4, device="meta"),
                                 backend="cpu")


def test_auto_picks_the_cpu_kernels_on_cpu_tensors():
    assert fastcaps.backends.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_a_samples_bits_do_not_depend_on_its_tile():
    """Samples are swept and differentiated in tiles of kSampleTile (4) that share each read
    of W (csrc/dynamic_routing/tuning.h): samples 4-6 are a tile of 3 in a batch of 7 and part
    of a tile of 4 in a batch of 9, and must give the same bits in both."""
    g = torch.Generator().manual_seed(3)
    u = fastcaps.squash(torch.randn(9, 301, 8, generator=g, dtype=torch.float64)).float()
    w = (torch.randn(7, 301, 11, 8, generator=g) * 0.3).requires_grad_()
    grad = torch.randn(9, 7, 11, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one sample per thread from 4 samples (samples_in_parallel)
    try:
        results = []
        for batch in (7, 9):
            x = u[:batch].clone().requires_grad_()
            v = fastcaps.dynamic_routing(x, w, None, 3, backend="cpu")
            results.append((v.detach(), *torch.autograd.grad(v, (x,), grad[:batch])))
    finally:
        torch.set_num_threads(threads)
    for seven, nine in zip(*results):
        assert torch.equal(seven, nine[:7])


def test_a_build_missing_for_this_cpu_is_named(monkeypatch):
    """An extension compiled without a wide build this CPU runs (clang compiles the baseline
    only) is found, so that import warns; forcing a build turns that off."""
    if not extension.runnable_isas() or extension.runnable_isas()[0] == "baseline":
        pytest.skip("this CPU runs no wide build")
    widest = extension.runnable_isas()[0]
    monkeypatch.delenv("FASTCAPS_CPU_ISA", raising=False)
    assert extension._missing_wide_build() is None
    monkeypatch.setattr(extension, "runnable_isas", lambda: ["baseline"])
    assert extension._missing_wide_build() == widest
    monkeypatch.setenv("FASTCAPS_CPU_ISA", "baseline")
    assert extension._missing_wide_build() is None


# The kernels are compiled for AVX-512, AVX2 and baseline x86-64, and the widest build the
# CPU runs is taken (csrc/dynamic_routing/routing.cpp). valgrind emulates a CPU without
# AVX-512, so under it the AVX2 build runs: on an AVX-512 machine that is the one path the
# tests above cannot force.
_CLONE_PROGRAM = textwrap.dedent("""
    import itertools, torch, fastcaps
    g = torch.Generator().manual_seed(0)
    # Batch 1 with in_dim 4 also takes u_hat from W's rows (predict_from_rows).
    for dtype, (batch, in_dim) in itertools.product((torch.float32, torch.float64), ((3, 5), (1, 4))):
        u = fastcaps.squash(torch.randn(batch, 37, in_dim, generator=g, dtype=dtype)).requires_grad_()
        w = (torch.randn(4, 37, 6, in_dim, generator=g, dtype=dtype) * 0.3).requires_grad_()
        grad = torch.randn(batch, 4, 6, generator=g, dtype=dtype)
        results = []
        for backend in ("cpu", "reference"):
            v = fastcaps.dynamic_routing(u, w, None, 3, backend=backend)
            results.append([v, *torch.autograd.grad(v, (u, w), grad)])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
    print("build ok", fastcaps.kernels.cpu.extension.isa())
""")


@pytest.mark.skipif(shutil.which("valgrind") is None or platform.machine() != "x86_64",
                    reason="needs valgrind on x86-64")
def test_avx2_build_under_valgrind_matches_the_reference():
    completed = subprocess.run(["valgrind", "-q", "--tool=none", sys.executable, "-c", _CLONE_PROGRAM],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # The CPU valgrind shows has no AVX-512, so what passed was not the AVX-512 build.
    assert "build ok avx2" in completed.stdout, completed.stdout


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_dim", [5, 4])
def test_kept_u_hat_gives_the_recomputing_backward(in_dim, dtype, detach, batch):
    """Small batches keep the forward's u_hat; the backward then reads it instead of
    recomputing u_hat, and at B = 1 takes grad u and grad W from W in its own layout (a
    vector at a time where in_dim is a power of two, gradient_rows). Same gradients as the
    recomputing backward, up to the order of the sums."""
    from fastcaps.kernels.cpu import dynamic_routing as cpu_kernels

    g = torch.Generator().manual_seed(1)
    u = fastcaps.squash(torch.randn(batch, 37, in_dim, generator=g, dtype=dtype))
    weight = torch.randn(4, 37, 6, in_dim, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(4, 6, generator=g, dtype=dtype) * 0.3
    v, s, kept_u_hat = cpu_kernels.routing_forward(u, weight, bias, 3, detach, detach)
    lanes = torch.ops.fastcaps._routing_cpu_kept_layout(dtype)[0]
    assert lanes * dtype.itemsize in (64, 32, 16)  # one vector of the build: AVX-512, AVX2, baseline
    assert kept_u_hat.numel() == batch * -(-37 // lanes) * lanes * 4 * 6
    grad_v = torch.randn(v.shape, generator=g, dtype=dtype)
    kept = cpu_kernels.routing_backward(grad_v, u, weight, bias, s, kept_u_hat, 3, detach, detach)
    recomputed = cpu_kernels.routing_backward(grad_v, u, weight, bias, s, kept_u_hat[:0], 3, detach, detach)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_kept_u_hat_of_the_wrong_size_is_refused():
    u, weight = torch.randn(2, 5, 3), torch.randn(4, 5, 6, 3)
    with pytest.raises(RuntimeError, match="kept_u_hat must be empty or hold batch"):
        torch.ops.fastcaps.routing_cpu_forward(u, weight, torch.empty(0), 3, False, torch.empty(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_dim", [1, 2, 4, 8, 16, 5])
@pytest.mark.parametrize("out_dim", [1, 11, 17])
def test_one_sample_predicts_u_hat_from_the_rows_of_w(in_dim, out_dim, dtype):
    """At B = 1 the forward takes u_hat from W's rows by a butterfly over segments of in_dim
    lanes (csrc/dynamic_routing/rows.h, predict_from_rows) where in_dim is a power of two of at
    most one vector (16 floats and 8 doubles in the AVX-512 build, 8 and 4 in AVX2), and packs
    W otherwise (5, and the wider in_dims).
    Rows of out_dim * in_dim values end inside a vector at the odd sizes; 301 capsules end
    inside a block."""
    g = torch.Generator().manual_seed(in_dim * 100 + out_dim)
    u = fastcaps.squash(torch.randn(1, 301, in_dim, generator=g, dtype=dtype)).requires_grad_()
    weight = (torch.randn(3, 301, out_dim, in_dim, generator=g, dtype=dtype) * 0.3).requires_grad_()
    bias = (torch.randn(3, out_dim, generator=g, dtype=dtype) * 0.3).requires_grad_()
    grad_v = torch.randn(1, 3, out_dim, generator=g, dtype=dtype)
    results = []
    for backend, cast in (("cpu", dtype), ("reference", torch.float64)):
        inputs = [t.detach().to(cast).requires_grad_() for t in (u, weight, bias)]
        v = fastcaps.dynamic_routing(*inputs, 3, backend=backend)
        results.append([v, *torch.autograd.grad(v, inputs, grad_v.to(cast))])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for got, expected in zip(*results):
        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
