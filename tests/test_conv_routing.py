"""Convolutional capsules (conv_dynamic_routing, ConvCaps2d) and routing from given votes
(route_votes): the references proven by explicit loops, every backend against them, the
ops, errors, determinism and torch.compile."""

import pytest
import torch
import torch.nn.functional as torch_functional

import fastcaps
from fastcaps import reference
from fastcaps.cases import ConvShape, RoutingShape, make_conv_inputs, make_inputs
from fastcaps.kernels import windows
from fastcaps.tools import check

# Conv-capable kernels that run here at these sizes ("triton": test_triton_kernels.py).
KERNELS = [b for b in fastcaps.available_backends("cpu") if b not in ("reference", "triton")]
BACKENDS = ["reference"] + KERNELS


def loop_conv_routing(u, weight, bias, iterations, stride, padding, dilation, detach, leaky):
    """One output position at a time: its window's capsules gathered by hand from the
    zero-padded grid, in (i, kh, kw) order, then dense routing."""
    batch, in_caps, in_dim, height, width = u.shape
    out_caps, _, kh, kw, out_dim, _ = weight.shape
    padded = torch_functional.pad(u, (padding[1], padding[1], padding[0], padding[0]))
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    dense_weight = weight.reshape(out_caps, in_caps * kh * kw, out_dim, in_dim)
    rows = []
    for y in range(out_h):
        row = []
        for x in range(out_w):
            window = torch.stack([padded[:, i, :, y * stride[0] + a * dilation[0], x * stride[1] + c * dilation[1]]
                                  for i in range(in_caps) for a in range(kh) for c in range(kw)], dim=1)
            row.append(reference.dynamic_routing(window, dense_weight, bias, iterations, detach, leaky=leaky))
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)


@pytest.mark.parametrize("shape", check.CONV_SHAPES, ids=str)
@pytest.mark.parametrize("leaky", [False, True])
def test_reference_matches_a_loop_over_positions(shape, leaky):
    u, weight, bias, _ = make_conv_inputs(shape, 3, bias=True)
    got = reference.conv_dynamic_routing(u, weight, bias, 3, shape.stride, shape.padding, shape.dilation,
                                         leaky=leaky)
    want = loop_conv_routing(u, weight, bias, 3, shape.stride, shape.padding, shape.dilation, False, leaky)
    assert got.shape == shape.v_shape
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_over_the_whole_grid_is_digitcaps(backend):
    """K = H = W, padding 0: one position, whose children are PrimaryCaps' flattened grid."""
    shape = ConvShape(3, 4, 5, 3, 2, 6, 7, (3, 2))
    u, weight, bias, _ = make_conv_inputs(shape, 0, bias=True)
    v = fastcaps.conv_dynamic_routing(u, weight, bias, 3, backend=backend)
    dense = fastcaps.dynamic_routing(u.permute(0, 1, 3, 4, 2).reshape(3, 4 * 3 * 2, 5),
                                     weight.reshape(6, 4 * 3 * 2, 7, 5), bias, 3, backend=backend)
    torch.testing.assert_close(v[..., 0, 0], dense, rtol=1e-12, atol=1e-13)


def test_primary_caps_grid_is_the_flat_capsules_on_their_grid():
    primary = fastcaps.PrimaryCaps(6, 4, 3, 3, 1)
    on_grid = fastcaps.PrimaryCaps(6, 4, 3, 3, 1, grid=True)
    on_grid.load_state_dict(primary.state_dict())
    x = torch.randn(2, 6, 7, 8)
    flat, grid = primary(x), on_grid(x)
    assert grid.shape == (2, 4, 3, 5, 6)
    torch.testing.assert_close(grid.permute(0, 1, 3, 4, 2).reshape(2, -1, 3), flat)


# Every backend against the float64 reference: the check tool's conv rows (values and every
# gradient, float64 within 1e-10 and float32 within 1e-4, a finite difference in float64).
CONV_CASES = [case for case in check.default_cases() if isinstance(case.shape, ConvShape)]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c.shape} {c.options}".replace(" ", "-"))
def test_kernels_match_the_reference(case):
    seed = CONV_CASES.index(case)
    oracle = check.oracle_for(case, seed)
    for backend in KERNELS:
        for dtype in (torch.float64, torch.float32):
            row = check.check_case(backend, case, dtype, seed, oracle)
            assert row.passed, check.format_row(row)


@pytest.mark.parametrize("backend", KERNELS)
# With detach_routing and r > 1 the gradient is a stop-gradient, not the forward's derivative
# (the reference comparison above covers it).
@pytest.mark.parametrize("iterations, detach, leaky", [(1, False, False), (3, False, True), (1, True, True)])
def test_gradcheck(backend, iterations, detach, leaky):
    shape = ConvShape(2, 2, 3, 5, 4, 3, 2, (3, 2), (2, 1), (1, 1))
    u, weight, bias, _ = make_conv_inputs(shape, 1, bias=True)
    inputs = [t.requires_grad_() for t in (u, weight, bias)]

    def route(u, weight, bias):
        return fastcaps.conv_dynamic_routing(u, weight, bias, iterations, shape.stride, shape.padding,
                                             detach_routing=detach, leaky=leaky, backend=backend)

    assert torch.autograd.gradcheck(route, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    shape = ConvShape(2, 2, 3, 5, 4, 3, 2, (2, 2), (2, 1), (1, 0))
    u, weight, bias, grad_v = make_conv_inputs(shape, 2, bias=True)
    arguments = (u, weight, bias, 2, [2, 1], [1, 0], [1, 1], False, True, backend)
    torch.library.opcheck(torch.ops.fastcaps.conv_routing.default, arguments)
    _, s = torch.ops.fastcaps.conv_routing(*arguments)
    torch.library.opcheck(torch.ops.fastcaps.conv_routing_backward.default,
                          (grad_v, u, weight, bias, s, 2, [2, 1], [1, 0], [1, 1], False, True, backend))


def _on_one_thread(run):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return run()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", KERNELS)
def test_chunks_of_samples_give_the_same_bits(backend, monkeypatch):
    """Windows gathered a sample at a time equal windows gathered for the whole batch, and the
    results are the same bits for one and two threads."""
    shape = ConvShape(5, 3, 4, 6, 6, 4, 5, (3, 3), (1, 1), (1, 1))
    u, weight, bias, grad_v = make_conv_inputs(shape, 4, bias=True, dtype=torch.float32)

    def run():
        leaves = [t.clone().requires_grad_() for t in (u, weight, bias)]
        v = fastcaps.conv_dynamic_routing(leaves[0], leaves[1], leaves[2], 3, 1, 1, leaky=True, backend=backend)
        return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]

    whole = run()
    assert all(torch.equal(a, b) for a, b in zip(whole, _on_one_thread(run)))
    monkeypatch.setattr(windows, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    u, weight = torch.randn(2, 3, 4, 5, 5), torch.randn(6, 3, 3, 3, 7, 4)
    cases = [
        (dict(weight=torch.randn(6, 3, 7, 7, 7, 4)), ValueError, "window .* larger than the padded grid"),
        (dict(u=torch.randn(2, 3, 4, 5)), ValueError, "u must have shape \\(batch, in_caps, in_dim, height, width\\)"),
        (dict(weight=torch.randn(6, 3, 3, 7, 4)), ValueError, "weight must have shape"),
        (dict(u=torch.randn(2, 2, 4, 5, 5)), ValueError, "expects u of shape \\(batch, 3, 4, height, width\\)"),
        (dict(stride=0), ValueError, "stride must be at least 1"),
        (dict(padding=-1), ValueError, "padding must be at least 0"),
        (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair of ints"),
        (dict(bias=torch.randn(6, 6)), ValueError, "bias must have shape \\(out_caps, out_dim\\) = \\(6, 7\\)"),
        (dict(iterations=0), ValueError, "iterations must be >= 1"),
        (dict(leaky=1), TypeError, "leaky must be a bool"),
        (dict(u=torch.randn(2, 3, 4, 5, 5).double()), TypeError, "weight has dtype torch.float32 but u has"),
    ]
    for change, error, message in cases:
        arguments = {**dict(u=u, weight=weight, backend=backend), **change}
        with pytest.raises(error, match=message):
            fastcaps.conv_dynamic_routing(**arguments)
    # Padding makes room for a window the grid alone cannot hold.
    assert fastcaps.conv_dynamic_routing(u, torch.randn(6, 3, 7, 7, 7, 4), padding=1, backend=backend).shape == (
        2, 6, 7, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_compute_in_float32(backend):
    shape = ConvShape(2, 3, 4, 5, 5, 4, 6, (3, 3), (2, 2), (1, 1))
    u, weight, bias, grad_v = make_conv_inputs(shape, 5, bias=True)
    exact = [t.clone().requires_grad_() for t in (u, weight, bias)]
    low = [t.to(torch.bfloat16).requires_grad_() for t in (u, weight, bias)]
    v_exact = reference.conv_dynamic_routing(*exact, 3, 2, 1)
    v_low = fastcaps.conv_dynamic_routing(*low, 3, 2, 1, backend=backend)
    assert v_low.dtype == torch.bfloat16
    grads = torch.autograd.grad(v_low, low, grad_v.to(torch.bfloat16))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    for got, want in zip([v_low, *grads], [v_exact, *torch.autograd.grad(v_exact, exact, grad_v)]):
        assert check.normwise_error(got.double(), want) < 3e-2


def test_conv_caps_module_and_torch_compile_match_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastcaps.PrimaryCaps(3, 4, 4, 3, 1, grid=True),
                                fastcaps.ConvCaps2d(4, 4, 3, 5, 3, stride=2, padding=1, bias=True, leaky=True))
    x = torch.randn(2, 3, 9, 9)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
    assert "kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)" in repr(model[1])


# --- route_votes -----------------------------------------------------------------------

def _votes(leading=(2, 3), in_caps=7, out_caps=4, out_dim=5, seed=0, dtype=torch.float64):
    u, weight, bias, _ = make_inputs(RoutingShape(1, in_caps, 3, out_caps, out_dim), seed, bias=True)
    generator = torch.Generator().manual_seed(seed)
    votes = torch.randn(*leading, in_caps, out_caps, out_dim, generator=generator, dtype=torch.float64) * 0.6
    return votes.to(dtype), bias.to(dtype)


def test_route_votes_reference_is_dense_routing_of_the_votes():
    """Votes W u routed by route_votes equal dynamic_routing of u with W."""
    u, weight, bias, _ = make_inputs(RoutingShape(3, 7, 3, 4, 5), 0, bias=True)
    votes = torch.einsum("jide,bie->bijd", weight, u)
    for leaky in (False, True):
        torch.testing.assert_close(reference.route_votes(votes, bias, 3, leaky=leaky),
                                   reference.dynamic_routing(u, weight, bias, 3, leaky=leaky), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("iterations, detach, leaky", [(1, False, False), (3, False, False), (3, True, True),
                                                       (2, False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", KERNELS)
def test_route_votes_matches_the_reference(iterations, detach, leaky, dtype, backend):
    votes, bias = _votes(seed=iterations)
    grad_v = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (votes, bias)]
    v_ref = reference.route_votes(*exact, iterations, detach, leaky)
    want = [v_ref, *torch.autograd.grad(v_ref, exact, grad_v)]
    leaves = [t.to(dtype).requires_grad_() for t in (votes, bias)]
    v = fastcaps.route_votes(*leaves, iterations, detach, leaky, backend)
    got = [v, *torch.autograd.grad(v, leaves, grad_v.to(dtype))]
    assert v.shape == (2, 3, 4, 5)
    for a, b in zip(got, want):
        assert check.normwise_error(a.double(), b) <= check.TOLERANCE[dtype]


@pytest.mark.parametrize("backend", KERNELS)
def test_route_votes_gradcheck_and_opcheck(backend):
    votes, bias = _votes(leading=(3,), in_caps=19, out_caps=3, out_dim=2)
    for leaky in (False, True):
        assert torch.autograd.gradcheck(lambda x, b: fastcaps.route_votes(x, b, 3, leaky=leaky, backend=backend),
                                        (votes.clone().requires_grad_(), bias.clone().requires_grad_()),
                                        eps=1e-6, atol=1e-8, rtol=1e-6)
    torch.library.opcheck(torch.ops.fastcaps.route_votes.default, (votes, bias, 3, False, True, backend))
    _, s = torch.ops.fastcaps.route_votes(votes, bias, 3, False, True, backend)
    torch.library.opcheck(torch.ops.fastcaps.route_votes_backward.default,
                          (torch.randn(3, 3, 2, dtype=torch.float64), votes, bias, s, 3, False, True, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_route_votes_bits_do_not_depend_on_threads_or_chunks(backend, monkeypatch):
    votes, bias = _votes(leading=(37,), in_caps=21, out_caps=5, out_dim=6, dtype=torch.float32)
    grad_v = torch.randn(37, 5, 6, generator=torch.Generator().manual_seed(3))

    def run(dtype=torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (votes, bias)]
        v = fastcaps.route_votes(*leaves, 3, leaky=True, backend=backend)
        return [v.detach(), *torch.autograd.grad(v, leaves, grad_v.to(dtype))]

    both = run()
    assert all(torch.equal(a, b) for a, b in zip(both, _on_one_thread(run)))
    if backend == "cpu":
        from fastcaps.kernels.cpu import route_votes as cpu_votes
        half = run(torch.float16)
        monkeypatch.setattr(cpu_votes, "_CHUNK_ELEMENTS", 5 * 21 * 30)  # chunks of 5 rows
        assert all(torch.equal(a, b) for a, b in zip(run(), both))  # float32: one call, not chunked
        chunked = run(torch.float16)  # half votes are converted in chunks
        assert all(torch.equal(a, b) for a, b in zip(chunked[:2], half[:2]))
        # grad bias is summed over chunks: the same value, maybe rounded otherwise
        torch.testing.assert_close(chunked[2], half[2], rtol=2e-3, atol=1e-3)


def test_route_votes_errors():
    votes, bias = _votes()
    with pytest.raises(ValueError, match="votes must have shape \\(..., in_caps, out_caps, out_dim\\)"):
        fastcaps.route_votes(votes[0, 0, 0])
    with pytest.raises(ValueError, match="bias must have shape"):
        fastcaps.route_votes(votes, bias[:2])
    with pytest.raises(TypeError, match="votes must be a floating-point tensor"):
        fastcaps.route_votes(votes.long())


def test_check_covers_route_votes():
    from fastcaps.cases import VotesShape
    from fastcaps.tools import check
    cases = [case for case in check.default_cases() if isinstance(case.shape, VotesShape)]
    assert {case.leaky for case in cases} == {False, True} and {case.bias for case in cases} == {False, True}
    backends = ["torch", "cpu"] if "cpu" in fastcaps.available_backends("cpu") else ["torch"]
    rows = check.run(backends, cases[:3], [torch.float64])
    assert len(rows) == 3 * len(backends) and all(row.passed for row in rows)
    assert all(row.error_grad_weight is None and row.error_fd is not None for row in rows)
