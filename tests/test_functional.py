"""Public functional API: validation messages, backend choice, squash and the losses."""

import warnings

import pytest
import torch

import fastcaps
from fastcaps import functional as F
from fastcaps import reference

U = torch.randn(2, 6, 3)
W = torch.randn(4, 6, 5, 3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"u": torch.randn(6, 3)}, ValueError, r"u must have shape \(batch, in_caps, in_dim\)"),
        ({"weight": torch.randn(4, 6, 5)}, ValueError, r"weight must have shape \(out_caps, in_caps, out_dim, in_dim\)"),
        ({"weight": torch.randn(4, 7, 5, 3)}, ValueError, r"expects u of shape \(batch, 7, 3\)"),
        ({"u": torch.randn(2, 6, 2)}, ValueError, r"expects u of shape \(batch, 6, 3\)"),
        ({"bias": torch.randn(5, 4)}, ValueError, r"bias must have shape \(out_caps, out_dim\) = \(4, 5\)"),
        ({"bias": torch.randn(4, 5, dtype=torch.float64)}, TypeError, "bias has dtype torch.float64 but u has dtype torch.float32"),
        ({"weight": W.double()}, TypeError, "weight has dtype torch.float64"),
        ({"u": torch.ones(2, 6, 3, dtype=torch.int64)}, TypeError, "u must be a floating-point tensor"),
        ({"weight": torch.ones(4, 6, 5, 3, dtype=torch.int32)}, TypeError, "weight must be a floating-point tensor"),
        ({"u": torch.ones(2, 6, 3, dtype=torch.complex64)}, TypeError, "u must be a floating-point tensor"),
        ({"weight": torch.ones(4, 6, 5, 3, dtype=torch.complex128)}, TypeError, "weight must be a floating-point tensor"),
        ({"bias": torch.ones(4, 5, dtype=torch.int64)}, TypeError, "bias has dtype torch.int64 but u has dtype torch.float32"),
        ({"bias": [[0.0] * 5] * 4}, TypeError, "bias must be a tensor or None"),
        ({"u": [[1.0]]}, TypeError, "u must be a tensor"),
        ({"iterations": 0}, ValueError, "iterations must be >= 1, got 0"),
        ({"iterations": 2.0}, TypeError, "iterations must be an int >= 1"),
        ({"iterations": True}, TypeError, "iterations must be an int >= 1"),
        ({"detach_routing": 1}, TypeError, "detach_routing must be a bool"),
        ({"backend": "cuda"}, ValueError, "backend='cuda' is not a fastcaps backend"),
        ({"weight": torch.randn(0, 6, 5, 3)}, ValueError, "out_caps, out_dim and in_dim must be at least 1"),
    ],
)
@pytest.mark.parametrize("backend", fastcaps.available_backends("cpu"))
def test_bad_arguments_raise_naming_the_argument(kwargs, error, message, backend):
    call = {"u": U, "weight": W, "bias": None, "iterations": 3, "detach_routing": False, "backend": backend}
    call.update(kwargs)
    with pytest.raises(error, match=message):
        F.dynamic_routing(**call)


@pytest.mark.parametrize("backend", fastcaps.available_backends("cpu"))
def test_device_mismatch_is_named(backend):
    with pytest.raises(ValueError, match="weight is on meta but u is on cpu"):
        F.dynamic_routing(U, W.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="bias is on meta but u is on cpu"):
        F.dynamic_routing(U, W, torch.zeros(4, 5, device="meta"), backend=backend)


def test_available_backends_and_auto():
    assert fastcaps.available_backends("cpu")[:2] == ["reference", "torch"]
    assert fastcaps.backends.resolve_backend("auto", torch.device("cpu")) in fastcaps.available_backends("cpu")


def test_auto_announces_a_fallback_once_per_device_type(monkeypatch):
    # CUDA without triton, simulated: resolving a backend needs no CUDA device.
    monkeypatch.setattr(fastcaps.backends, "triton_problem", lambda: "triton is not installed. Install it with: X")
    monkeypatch.setattr(fastcaps.backends, "_announced_fallbacks", set())
    cuda = torch.device("cuda")
    expected = r"backend='auto' on cuda tensors runs the 'torch' kernel, because 'triton' is unavailable: triton is not installed"
    with pytest.warns(RuntimeWarning, match=expected):
        assert fastcaps.backends.resolve_backend("auto", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastcaps.backends.resolve_backend("auto", cuda) == "torch"  # said once already
        assert fastcaps.backends.resolve_backend("torch", cuda) == "torch"  # forced: nothing to say
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cuda: triton is not installed"):
        fastcaps.backends.resolve_backend("triton", cuda)


def test_auto_fallback_inside_torch_compile_keeps_one_graph(monkeypatch):
    # dynamo cannot trace warnings.warn: the announcement waits for an eager call instead.
    monkeypatch.setattr(fastcaps.backends._extension, "problem", lambda: "the C++ extension is missing")
    monkeypatch.setattr(fastcaps.backends, "_announced_fallbacks", set())
    compiled = torch.compile(F.dynamic_routing, fullgraph=True, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(compiled(U, W), F.dynamic_routing(U, W, backend="torch"))
    with pytest.warns(RuntimeWarning, match="runs the 'torch' kernel, because 'cpu' is unavailable: the C\\+\\+ extension is missing"):
        F.dynamic_routing(U, W)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTCAPS_BACKEND", "reference")
    assert fastcaps.backends.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTCAPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTCAPS_BACKEND='bogus' is not a fastcaps backend"):
        F.dynamic_routing(U, W)


def test_backends_agree_through_the_public_api():
    v_reference = F.dynamic_routing(U, W, backend="reference")
    torch.testing.assert_close(F.dynamic_routing(U, W, backend="torch"), v_reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.dynamic_routing(U, W), v_reference, rtol=1e-5, atol=1e-6)


def test_squash_along_a_dimension_and_at_zero():
    s = torch.randn(3, 8, 5, dtype=torch.float64)
    torch.testing.assert_close(F.squash(s, dim=1), reference.squash(s, dim=1))
    zero = torch.zeros(2, 4, requires_grad=True)
    v = F.squash(zero)
    v.sum().backward()
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(zero.grad, torch.zeros_like(zero.grad))


def test_squash_gradient_matches_autograd_of_the_reference():
    s = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 7, dtype=torch.float64)
    (ours,) = torch.autograd.grad(F.squash(s), s, grad)
    (theirs,) = torch.autograd.grad(reference.squash(s), s, grad)
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(F.squash, (s,))


def test_squash_stays_finite_at_extreme_magnitudes():
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1.0, 1e15, 1e30):
        s = (torch.randn(64, 16, generator=generator) * scale).requires_grad_()
        v = F.squash(s)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(s.grad).all()
        lengths = torch.linalg.vector_norm(v, dim=-1)
        # |v| = n^2 / (1 + n^2) < 1 exactly; in float32 it rounds to 1 for n > 4096, and
        # recomputing the norm of v can add one ulp.
        assert (lengths <= 1 + torch.finfo(torch.float32).eps).all()
        if scale >= 1.0:
            # The direction is s's (computed in float64, where |s|^2 does not overflow), and
            # huge inputs are capsules of length ~1, not 0 (an overflowing |s|^2 gave v = 0).
            direction = s.detach().double() / s.detach().double().norm(dim=-1, keepdim=True)
            torch.testing.assert_close(v.detach().double() / lengths.double().unsqueeze(-1), direction,
                                       rtol=1e-5, atol=1e-6)
        if scale >= 1e15:
            assert (lengths >= 1 - 1e-6).all()


def test_squash_rejects_integers():
    with pytest.raises(TypeError, match="squash: s must be a floating-point tensor"):
        F.squash(torch.ones(3, dtype=torch.int64))


def test_margin_loss_matches_the_paper():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.8, 0.15]])
    labels = torch.tensor([0, 2])
    # sample 0: present 0.95 >= 0.9 -> 0; absent 0.05 -> 0, 0.5 -> 0.5 * 0.4^2
    # sample 1: present 0.15 -> 0.75^2; absent 0.2 -> 0.5 * 0.1^2, 0.8 -> 0.5 * 0.7^2
    expected = (0.5 * 0.16 + (0.5625 + 0.5 * 0.01 + 0.5 * 0.49)) / 2
    torch.testing.assert_close(F.margin_loss(lengths, labels), torch.tensor(expected))
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(F.margin_loss(lengths, one_hot), torch.tensor(expected))
    assert F.margin_loss(lengths, labels, reduction="none").shape == (2,)


@pytest.mark.parametrize(
    "target, message",
    [
        (torch.tensor([0, 3]), r"labels must lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2]), r"class labels of shape \(2,\)"),
        (torch.zeros(2, 4), "must have the shape of lengths"),
        (torch.tensor([True, False]), "integer labels or floating targets"),
    ],
)
def test_margin_loss_rejects_bad_targets(target, message):
    with pytest.raises((ValueError, TypeError), match=message):
        F.margin_loss(torch.rand(2, 3), target)


def test_reconstruction_loss_is_summed_per_image_and_averaged_over_the_batch():
    images = torch.rand(3, 1, 4, 4)
    reconstruction = torch.rand(3, 16)
    expected = ((reconstruction - images.view(3, 16)) ** 2).sum() / 3
    torch.testing.assert_close(F.reconstruction_loss(reconstruction, images), expected)
    with pytest.raises(ValueError, match="same number of samples and pixels"):
        F.reconstruction_loss(reconstruction, torch.rand(3, 15))
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.reconstruction_loss(reconstruction, images, reduction="avg")


@pytest.mark.parametrize("route", [F.dynamic_routing, reference.dynamic_routing], ids=["functional", "reference"])
def test_the_old_keyword_detach_still_works_with_a_warning(route):
    u, weight = U.clone().requires_grad_(), W.clone().requires_grad_()
    with pytest.warns(FutureWarning, match="the keyword 'detach' is deprecated; use 'detach_routing'"):
        old = route(u, weight, detach=True)
    new = route(u, weight, detach_routing=True)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    grad = torch.randn_like(new)
    for a, b in zip(torch.autograd.grad(old, (u, weight), grad), torch.autograd.grad(new, (u, weight), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_reference_backend_computes_half_inputs_in_float32(dtype):
    """backend="reference" upcasts as every kernel does: at inputs of scale 300 the sums pass
    float16's range, and the same-dtype loop (the oracle's non-upcasting mode) returns NaN."""
    torch.manual_seed(0)
    caps = fastcaps.DigitCaps(64, 8, 4, 16, backend="reference").to(dtype)
    u = (torch.randn(3, 64, 8) * 300).to(dtype).requires_grad_()
    v = caps(u)
    assert v.dtype == dtype and torch.isfinite(v).all()
    v.float().sum().backward()
    assert u.grad.dtype == dtype and torch.isfinite(u.grad).all() and torch.isfinite(caps.weight.grad).all()
    wide = reference.dynamic_routing(u.detach().float(), caps.weight.detach().float())
    torch.testing.assert_close(v.float(), wide.to(dtype).float(), rtol=0, atol=0)
    if dtype == torch.float16:
        assert not torch.isfinite(reference.dynamic_routing(u.detach(), caps.weight.detach())).all()
