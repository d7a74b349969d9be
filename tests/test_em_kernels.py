"""The EM kernels behind fastcaps::em_routing (the ``torch`` spec kernel and the fused C++
kernels, ``cpu``) against the float64 reference: values and every gradient, odd shapes, both
normalisations, iterations 1-3, detach; gradcheck, opcheck, extreme inputs, threads, memory,
torch.compile. The Triton kernels have none yet."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcaps
from fastcaps.tools import check, check_em

# Every backend with an EM kernel that runs here: a parameter of each test below.
BACKENDS = [b for b in ("torch", "cpu") if b in fastcaps.available_backends("cpu")]


class Call:
    """One EM call: 'conv' (stride, padding, dilation, normalization) or 'class' (grid or
    dense, coordinate addition)."""

    def __init__(self, kind, batch, in_caps, out_caps, side, grid, kernel=(3, 3), stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), normalization="per_child", coordinate_addition=False):
        self.kind, self.batch, self.in_caps, self.out_caps, self.side, self.grid = (kind, batch, in_caps, out_caps,
                                                                                   side, grid)
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.normalization, self.coordinate_addition = normalization, coordinate_addition

    def inputs(self, seed, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        poses = torch.randn(self.batch, self.in_caps, self.side, self.side, *self.grid, generator=g, dtype=torch.float64)
        acts = torch.rand(self.batch, self.in_caps, *self.grid, generator=g, dtype=torch.float64)
        shape = ((self.out_caps, self.in_caps, *self.kernel, self.side, self.side) if self.kind == "conv"
                 else (self.out_caps, self.in_caps, self.side, self.side))
        weight = torch.randn(*shape, generator=g, dtype=torch.float64) / self.side ** 0.5
        beta_u = torch.randn(self.out_caps, generator=g, dtype=torch.float64) * 0.5
        beta_a = torch.randn(self.out_caps, generator=g, dtype=torch.float64) * 0.5
        return [t.to(dtype) for t in (poses, acts, weight, beta_u, beta_a)]

    def run(self, tensors, iterations, lambdas, detach_routing, backend):
        if self.kind == "conv":
            return fastcaps.conv_em_routing(*tensors, iterations, self.stride, self.padding, self.dilation, lambdas,
                                            self.normalization, detach_routing, backend=backend)
        return fastcaps.em_routing(*tensors, iterations, lambdas, detach_routing, self.coordinate_addition,
                                   backend=backend)

    def __repr__(self):
        if self.kind == "conv":
            return (f"conv B{self.batch} I{self.in_caps} J{self.out_caps} P{self.side} {self.grid} K{self.kernel} "
                    f"s{self.stride} p{self.padding} d{self.dilation} {self.normalization}")
        return f"class B{self.batch} I{self.in_caps} J{self.out_caps} P{self.side} {self.grid} ca={self.coordinate_addition}"


CALLS = [
    Call("conv", 2, 3, 4, 4, (6, 5), (3, 3), (2, 2), (1, 1)),
    Call("conv", 2, 3, 4, 4, (6, 5), (3, 3), (2, 2), (1, 1), normalization="per_window"),
    Call("conv", 1, 2, 3, 3, (5, 7), (2, 3), (1, 2), (0, 1), (2, 1)),
    Call("conv", 3, 1, 1, 2, (4, 4), (1, 1)),
    Call("conv", 1, 2, 5, 4, (3, 3), (3, 3)),                        # one window over the whole grid
    Call("class", 2, 3, 5, 4, (3, 2), coordinate_addition=True),
    Call("class", 3, 7, 3, 4, ()),                                   # dense: poses (B, I, 4, 4)
    Call("class", 1, 1, 1, 1, ()),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_every_kernel_matches_the_float64_reference(backend):
    """fastcaps check's EM rows (one comparison for every backend): values and the gradients of
    poses, activations, W, beta_u and beta_a at odd calls, both normalisations, iterations 1-3,
    detach on and off; float64 within 1e-10, float32 within 1e-4 (or twice the reference's own
    float32 error where that is larger)."""
    rows = check_em.run_em([backend], [torch.float64, torch.float32])
    assert len(rows) == 2 * len(check_em.em_cases())
    failed = [(str(r.case.shape), r.case.options, r.dtype, r.errors) for r in rows if not r.passed]
    assert not failed, failed


def test_gradcheck_and_opcheck(backend):
    call = Call("conv", 1, 2, 2, 2, (3, 4), (2, 2), (1, 1), (1, 0))
    tensors = [t.requires_grad_() for t in call.inputs(3)]

    def f(*args):
        return call.run(args, 2, [1.0, 2.0], False, backend)

    assert torch.autograd.gradcheck(f, tensors)
    for normalization, weight in (("per_child", tensors[2]), ("per_window", tensors[2])):
        args = (*[t.detach() for t in tensors[:2]], weight.detach(), *[t.detach() for t in tensors[3:]],
                [1.0, 2.0], [1, 1], [1, 0], [1, 1], normalization, False, False, 1e-8, 1e-6, backend)
        torch.library.opcheck(torch.ops.fastcaps.em_routing, [t.requires_grad_() if isinstance(t, torch.Tensor)
                                                              else t for t in args])
    dense = Call("class", 2, 3, 2, 4, (2, 2), coordinate_addition=True).inputs(4)
    torch.library.opcheck(torch.ops.fastcaps.em_routing, [*[t.requires_grad_() for t in dense], [0.5], [1, 1],
                                                          [0, 0], [1, 1], "per_window", True, False, 1e-8, 1e-6,
                                                          backend])


STRESS = {
    "zero activations": lambda p, a, w: (p, torch.zeros_like(a), w),
    "all-equal votes": lambda p, a, w: (torch.ones_like(p), a, torch.ones_like(w)),
    "votes x 1e6": lambda p, a, w: (p * 1e6, a, w),
    "votes x 1e-6": lambda p, a, w: (p * 1e-6, a, w),
}


@pytest.mark.parametrize("case", list(STRESS))
@pytest.mark.parametrize("call", [CALLS[0], CALLS[1], CALLS[5]], ids=repr)
def test_finite_everywhere(case, call, backend):
    poses, acts, weight, beta_u, beta_a = call.inputs(5, torch.float32)
    leaves = [t.requires_grad_() for t in (*STRESS[case](poses, acts, weight), beta_u, beta_a)]
    outputs = call.run(leaves, 3, 0.01, False, backend)
    grads = torch.autograd.grad(sum(x.sum() for x in outputs), leaves)
    assert all(torch.isfinite(t).all() for t in (*outputs, *grads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype, backend):
    call = CALLS[0]
    tensors = call.inputs(6, dtype)
    leaves = [t.requires_grad_() for t in tensors]
    outputs = call.run(leaves, 2, 0.5, False, backend)
    wide = call.run([t.detach().float() for t in tensors], 2, 0.5, False, backend)
    for got, want in zip(outputs, wide):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype))
    grads = torch.autograd.grad(sum(x.float().sum() for x in outputs), leaves)
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("normalization", ["per_child", "per_window"])
def test_one_and_two_threads(backend, normalization):
    """The C++ kernels sum in a fixed order (stripes of windows, then stripe order): bitwise the
    same for any thread count. torch's own reductions inside a chunk may round differently with
    the thread count, so the torch kernel agrees to rounding only (docs/em.md)."""
    script = textwrap.dedent("""
        import sys, torch, fastcaps
        torch.set_num_threads(int(sys.argv[1]))
        g = torch.Generator().manual_seed(0)
        poses = torch.randn(3, 4, 4, 4, 7, 7, generator=g).requires_grad_()
        acts = torch.rand(3, 4, 7, 7, generator=g).requires_grad_()
        weight = (torch.randn(5, 4, 3, 3, 4, 4, generator=g) / 2).requires_grad_()
        bu, ba = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
        out = fastcaps.conv_em_routing(poses, acts, weight, bu, ba, 3, 2, 1, inverse_temperature=0.1,
                                       normalization=sys.argv[4], backend=sys.argv[3])
        grads = torch.autograd.grad(out[0].sum() + out[1].sum(), [poses, acts, weight, bu, ba])
        torch.save([t.detach() for t in (*out, *grads)], sys.argv[2])
    """)
    results = []
    for threads in (1, 2):
        path = f"/tmp/fastcaps-em-threads-{backend}-{normalization}-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(threads), path, backend, normalization], check=True)
        results.append(torch.load(path))
    for a, b in zip(*results):
        if backend == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_is_small_and_the_memory_does_not_grow_with_the_iterations(backend):
    call = Call("conv", 2, 8, 8, 4, (9, 9), (3, 3), (2, 2))
    tensors = [t.float() for t in call.inputs(7)]
    args = [*tensors, None, [2, 2], [0, 0], [1, 1], "per_child", False, False, 1e-8, 1e-6, backend]
    for iterations in (1, 3):
        args[5] = [0.1] * iterations
        _, _, state = torch.ops.fastcaps.em_routing(*args)
        # (B * windows, r - 1, J, 2 P^2 + 1): the parents' state, never votes or responsibilities.
        assert state.shape == (2 * 16, iterations - 1, 8, 33)
    # Autograd saves the inputs and the state: nothing of the size of the votes (C * J * 16 per window).
    leaves = [t.requires_grad_() for t in tensors]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        call.run(leaves, 3, 0.1, False, backend)
    votes = 2 * 16 * call.in_caps * 9 * call.out_caps * 16
    assert sum(saved) < votes / 4, (sum(saved), votes)


def test_auto_takes_the_fastest_em_kernel_and_triton_says_it_has_none():
    call = CALLS[0]
    tensors = call.inputs(8, torch.float32)
    auto = call.run(tensors, 2, 0.5, False, "auto")
    fastest = call.run(tensors, 2, 0.5, False, BACKENDS[-1])  # cpu when the extension is built
    for a, b in zip(auto, fastest):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend='triton' has no kernel for em_routing yet"):
        call.run(tensors, 2, 0.5, False, "triton")
    with pytest.raises(ValueError, match="backend='torch' has no kernel for em_route_votes yet"):
        fastcaps.em_route_votes(torch.randn(2, 3, 4, 16), torch.rand(2, 3), torch.zeros(4), torch.zeros(4),
                                backend="torch")


def test_compiled_matrix_capsnet_matches_eager_on_the_kernel(backend):
    torch.manual_seed(9)
    model = fastcaps.MatrixCapsNet(A=4, B=3, C=3, D=3, num_classes=2, iterations=2, backend=backend)
    images = torch.randn(2, 1, 28, 28)
    eager = model(images)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = compiled_model(images)
    torch.testing.assert_close(compiled.activations, eager.activations, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.poses, eager.poses, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(compiled.activations.sum(), list(model.parameters()))
    grads_eager = torch.autograd.grad(model(images).activations.sum(), list(model.parameters()))
    # Inductor reorders float32 sums, and how depends on the CPU's vector width: elementwise
    # 1e-5 against eager failed on AVX2 (Zen 3) at 1.1e-4 relative on one element, both
    # gradients ~1e-5 normwise from float64. So each is held to the float64 gradients, the
    # compiled one at most twice eager's own float32 error (or 1e-4, the EM float32 rule).
    model64 = copy.deepcopy(model).double()
    grads64 = torch.autograd.grad(model64(images.double()).activations.sum(), list(model64.parameters()))
    for (name, _), g, h, want in zip(model.named_parameters(), grads, grads_eager, grads64):
        eager_error = check.normwise_error(h.double(), want)
        assert check.normwise_error(g.double(), want) <= max(1e-4, 2 * eager_error), name


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_kernels_take_every_pose_side_they_are_compiled_for():
    """The C++ kernels are compiled for poses of side 1 to 8 (P^2 lanes padded to a power of two:
    1, 4, 9, 25, 64 entries in 2, 4, 16, 32, 64 lanes); a larger side is an error naming it."""
    from fastcaps.cases import EMShape
    cases = [check_em.EMCase(EMShape(2, 2, 3, (4, 4), side, (2, 2), (2, 1)), 2, False) for side in (1, 2, 3, 5, 8)]
    cases.append(check_em.EMCase(EMShape(2, 3, 2, (2, 2), 5, coordinate_addition=True), 3, False))
    rows = check_em.run_em(["cpu"], [torch.float64, torch.float32], cases)
    failed = [(str(r.case.shape), r.dtype, r.errors) for r in rows if not r.passed]
    assert len(rows) == 12 and not failed, failed
    poses = torch.randn(1, 1, 9, 9, 3, 3)
    with pytest.raises(RuntimeError, match="em_cpu: the C\\+\\+ kernels take poses of side 1 to 8, got 9"):
        fastcaps.conv_em_routing(poses, torch.rand(1, 1, 3, 3), torch.randn(2, 1, 3, 3, 9, 9), torch.zeros(2),
                                 torch.zeros(2), 2, backend="cpu")
