"""The fastcaps::routing op, its registry of kernels, and its "torch" kernel against the reference."""

import pytest
import torch

import fastcaps
from fastcaps import backends, ops, reference
from fastcaps.cases import RoutingShape, make_inputs
from fastcaps.kernels.torch import dynamic_routing as torch_kernels
from fastcaps.tools import check

FULL_GRID = check.full_cases()
# Every kernel of the routing op that runs here ("torch", and "cpu" when the extension is built).
# "triton" runs under the interpreter here, too slow for this grid: test_triton_kernels.py.
KERNELS = [b for b in fastcaps.available_backends("cpu") if b not in ("reference", "triton")]


@pytest.mark.parametrize("case", FULL_GRID, ids=lambda c: f"{c.shape} {c.options}".replace(" ", "-"))
def test_kernels_match_reference_on_the_full_grid(case):
    seed = FULL_GRID.index(case)
    oracle = check.oracle_for(case, seed)
    for backend in KERNELS:
        for dtype in (torch.float64, torch.float32):
            row = check.check_case(backend, case, dtype, seed, oracle)
            assert row.passed, check.format_row(row)


def _small_inputs(dtype=torch.float64, batch=3, in_caps=5, out_caps=4, out_dim=3, in_dim=2, bias=True, seed=0):
    u, weight, b, _ = make_inputs(RoutingShape(batch, in_caps, in_dim, out_caps, out_dim), seed, bias=bias, dtype=dtype)
    return [t if t is None else t.requires_grad_() for t in (u, weight, b)]


# With detach_routing and r > 1 the gradient is a stop-gradient, not the forward's derivative;
# the grid test checks it against the frozen-coupling forward (fastcaps/tools/check.py).
@pytest.mark.parametrize("iterations, detach", [(1, False), (2, False), (3, False), (1, True)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck(iterations, detach, with_bias, backend):
    u, weight, bias = _small_inputs(bias=with_bias)

    def route(u, weight, *maybe_bias):
        bias = maybe_bias[0] if maybe_bias else None
        return fastcaps.dynamic_routing(u, weight, bias, iterations, detach, backend=backend)

    inputs = (u, weight) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(route, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_routing_and_backward(with_bias, dtype, backend):
    u, weight, bias = _small_inputs(dtype=dtype, bias=with_bias)
    torch.library.opcheck(torch.ops.fastcaps.routing.default, (u, weight, bias, 3, False, False, backend))
    torch.library.opcheck(torch.ops.fastcaps.routing.default, (u, weight, bias, 2, True, True, backend))
    v, s, kept_u_hat = torch.ops.fastcaps.routing(u, weight, bias, 3, False, False, backend)
    grad_v = torch.randn_like(v)
    torch.library.opcheck(
        torch.ops.fastcaps.routing_backward.default,
        (grad_v, u.detach(), weight.detach(), None if bias is None else bias.detach(), s, kept_u_hat, 3, False,
         True, backend),
    )


@pytest.mark.parametrize("batch", [3, 5])
@pytest.mark.parametrize("backend", KERNELS)
def test_saved_state_is_s_per_iteration_and_small_batches_u_hat(backend, batch):
    u, weight, bias = _small_inputs(batch=batch, in_caps=21)
    v, s, kept_u_hat = torch.ops.fastcaps.routing(u, weight, bias, 3, False, False, backend)
    assert s.shape == (batch, 3, 4, 3) and not s.requires_grad and not kept_u_hat.requires_grad
    # s[:, t] is the pre-squash sum of iteration t: the last one squashes to v.
    torch.testing.assert_close(fastcaps.squash(s[:, -1]), v)
    # Only the C++ kernels keep u_hat, and only up to 4 samples: (B, blocks of `lanes` float64
    # capsules, J * D) vectors of `lanes` values, the width of the build that runs (8 doubles
    # in the AVX-512 build, 4 in AVX2, 2 in the baseline).
    kept = backend == "cpu" and batch <= 4
    lanes = torch.ops.fastcaps._routing_cpu_kept_layout(torch.float64)[0] if kept else 0
    assert kept_u_hat.shape == ((batch * -(-21 // lanes) * lanes * 4 * 3,) if kept else (0,))
    # The fake (torch.compile, meta tensors) gives the kernel's size.
    assert backends.kernels(backend).kept_numel(batch, 21, 4, 3, torch.float64) == kept_u_hat.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNELS)
def test_half_inputs_compute_in_float32(dtype, backend):
    """|kernel - ref64| <= 2 |ref_same_dtype - ref64| + atol, and the output keeps the dtype."""
    u, weight, bias = _small_inputs(dtype=torch.float64, batch=4, in_caps=40, out_caps=5, out_dim=8, in_dim=4)
    low = [t.detach().to(dtype).requires_grad_() for t in (u, weight, bias)]
    exact = [t.detach().double().requires_grad_() for t in low]
    v = fastcaps.dynamic_routing(*low, iterations=3, backend=backend)
    assert v.dtype == dtype
    v_ref_low = reference.dynamic_routing(*low, iterations=3)
    v_exact = reference.dynamic_routing(*exact, iterations=3)
    grad_v = torch.randn_like(v_exact)
    grads = torch.autograd.grad(v, low, grad_v.to(dtype))
    grads_ref_low = torch.autograd.grad(v_ref_low, low, grad_v.to(dtype))
    grads_exact = torch.autograd.grad(v_exact, exact, grad_v)
    assert all(g.dtype == dtype for g in grads)
    for got, same, want in zip([v, *grads], [v_ref_low, *grads_ref_low], [v_exact, *grads_exact]):
        atol = 1e-3 * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= 2 * (same.double() - want).abs().max().item() + atol


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_batch(backend):
    u, weight, bias = _small_inputs(batch=0)
    v = fastcaps.dynamic_routing(u, weight, bias, backend=backend)
    assert v.shape == (0, 4, 3)
    v.sum().backward()
    assert u.grad.shape == u.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_batches_larger_than_one_chunk(monkeypatch):
    # Force chunks of 2 samples: 7 samples -> chunks of 2, 2, 2, 1.
    monkeypatch.setattr(torch_kernels, "_CHUNK_ELEMENTS", 2 * 4 * 5 * 3)
    u, weight, bias = _small_inputs(batch=7)
    v = fastcaps.dynamic_routing(u, weight, bias, backend="torch")
    v_ref = reference.dynamic_routing(u, weight, bias)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-14)
    grad_v = torch.randn_like(v)
    for got, want in zip(torch.autograd.grad(v, (u, weight, bias), grad_v),
                         torch.autograd.grad(v_ref, (u, weight, bias), grad_v)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_unknown_kernel_name_is_refused_by_the_op():
    u, weight, bias = _small_inputs()
    with pytest.raises(ValueError, match="backend='nope' has no kernel"):
        ops.routing(u, weight, bias, 3, False, False, "nope")


def test_fake_tensors_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(6, 11, 4, dtype=torch.float16)
        weight = torch.empty(3, 11, 7, 4, dtype=torch.float16)
        v, s, kept_u_hat = torch.ops.fastcaps.routing(u, weight, None, 2, False, False, "torch")
        assert kept_u_hat.shape == (0,)
        assert v.shape == (6, 3, 7) and v.dtype == torch.float16
        assert s.shape == (6, 2, 3, 7) and s.dtype == torch.float32


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("batch", [1, 4, 5])
def test_fake_gives_the_kernels_kept_u_hat_size(backend, batch):
    """torch.compile plans with the fake: its kept_u_hat must be the forward's, whatever the
    kernel keeps (the C++ kernels keep u_hat up to 4 samples, in their own lane layout)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = torch.ops.fastcaps.routing(torch.randn(batch, 21, 2), torch.randn(4, 21, 3, 2), None, 3, False, False, backend)
    with FakeTensorMode():
        fake = torch.ops.fastcaps.routing(torch.empty(batch, 21, 2), torch.empty(4, 21, 3, 2), None, 3, False, False, backend)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]


def test_every_backend_with_kernels_has_them_where_the_registry_says():
    for name, entry in backends.REGISTRY.items():
        if entry.kernel_package is None:
            with pytest.raises(ValueError, match=f"backend={name!r} has no kernel"):
                backends.kernels(name)
        elif name in fastcaps.available_backends("cpu") or name == "torch":
            found = backends.kernels(name)
            assert isinstance(found, fastcaps.kernels.RoutingKernels)
            assert found.forward.__module__ == f"fastcaps.kernels.{entry.kernel_package}.dynamic_routing"


def test_the_op_refuses_a_backend_that_cannot_run(monkeypatch):
    """A direct call of the op gets the registry's reason (here: the C++ extension missing),
    not an error from deep inside a launcher."""
    monkeypatch.setattr(backends._extension, "problem", lambda: "the C++ extension is missing")
    u, weight, bias = _small_inputs()
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run on cpu: the C\\+\\+ extension is missing"):
        ops.routing(u, weight, bias, 3, False, False, "cpu")
