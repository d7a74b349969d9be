"""The reference proven on its own: against a loop-by-loop float64 computation, and
against the facts the mathematics guarantees."""

import itertools

import pytest
import torch

from fastcaps import reference
from fastcaps.cases import RoutingShape, make_inputs


def loop_routing(u, weight, bias, iterations, detach):
    """Procedure 1 written scalar by scalar, with explicit loops over b, i and j."""
    batch, in_caps, _ = u.shape
    out_caps = weight.shape[0]
    u_hat = [[[weight[j, i] @ u[b, i] for j in range(out_caps)] for i in range(in_caps)] for b in range(batch)]
    outputs = []
    for b in range(batch):
        logits = [[torch.zeros((), dtype=u.dtype) for _ in range(out_caps)] for _ in range(in_caps)]
        for iteration in range(iterations):
            last = iteration == iterations - 1
            predictions = [[p if (last or not detach) else p.detach() for p in row] for row in u_hat[b]]
            v = []
            for j in range(out_caps):
                s = torch.zeros_like(predictions[0][0])
                for i in range(in_caps):
                    denominator = sum(torch.exp(logits[i][k]) for k in range(out_caps))
                    s = s + torch.exp(logits[i][j]) / denominator * predictions[i][j]
                if bias is not None:
                    s = s + (bias[j] if (last or not detach) else bias[j].detach())
                norm_squared = (s * s).sum()
                v.append(norm_squared / (1 + norm_squared) * s / torch.sqrt(norm_squared))
            for i, j in itertools.product(range(in_caps), range(out_caps)):
                logits[i][j] = logits[i][j] + (predictions[i][j] * v[j]).sum()
        outputs.append(torch.stack(v))
    return torch.stack(outputs)


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_explicit_loops_in_float64(iterations, detach, with_bias):
    torch.manual_seed(iterations * 4 + 2 * detach + with_bias)
    u = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) if with_bias else None
    leaves = [u, weight] + ([bias] if with_bias else [])
    grad_v = torch.randn(2, 4, 3, dtype=torch.float64)

    v = reference.dynamic_routing(u, weight, bias, iterations, detach)
    expected = loop_routing(u, weight, bias, iterations, detach)
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(v, leaves, grad_v)
    expected_grads = torch.autograd.grad(expected, leaves, grad_v)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def _inputs(seed=0):
    u, weight, bias, _ = make_inputs(RoutingShape(batch=4, in_caps=9, in_dim=3, out_caps=5, out_dim=6), seed, bias=True)
    return u, weight, bias


def test_first_coupling_is_exactly_uniform_and_rows_sum_to_one():
    u, weight, _ = _inputs()
    _, couplings = reference.dynamic_routing(u, weight, iterations=3, return_couplings=True)
    assert torch.equal(couplings[0], torch.full_like(couplings[0], 1 / 5))
    for c in couplings:
        # Softmax over OUTPUT capsules: each input capsule's couplings sum to 1 over j.
        torch.testing.assert_close(c.sum(dim=2), torch.ones(4, 9, dtype=torch.float64))
    assert not torch.allclose(couplings[-1], couplings[0]), "routing should move the couplings"


def test_output_lengths_lie_in_zero_one():
    u, weight, bias = _inputs()
    for scale in (1e-3, 1.0, 1e3):
        v = reference.dynamic_routing(u, weight * scale, bias, iterations=3)
        lengths = torch.linalg.vector_norm(v, dim=-1)
        assert (lengths >= 0).all() and (lengths < 1).all()


def test_permuting_input_capsules_leaves_v_unchanged():
    u, weight, bias = _inputs()
    order = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    v = reference.dynamic_routing(u, weight, bias, iterations=3)
    permuted = reference.dynamic_routing(u[:, order], weight[:, order], bias, iterations=3)
    torch.testing.assert_close(permuted, v, rtol=1e-12, atol=1e-14)


def test_permuting_output_capsules_permutes_v():
    u, weight, bias = _inputs()
    order = torch.randperm(5, generator=torch.Generator().manual_seed(2))
    v = reference.dynamic_routing(u, weight, bias, iterations=3)
    permuted = reference.dynamic_routing(u, weight[order], bias[order], iterations=3)
    torch.testing.assert_close(permuted, v[:, order], rtol=1e-12, atol=1e-14)


def test_one_iteration_is_squash_of_the_mean_prediction_over_j():
    u, weight, _ = _inputs()
    u_hat = torch.einsum("jide,bie->bijd", weight, u)
    expected = reference.squash(u_hat.sum(dim=1) / weight.shape[0])
    torch.testing.assert_close(reference.dynamic_routing(u, weight, iterations=1), expected)


def test_squash_is_zero_with_zero_gradient_at_zero():
    s = torch.zeros(3, 16, dtype=torch.float64, requires_grad=True)
    v = reference.squash(s)
    (grad,) = torch.autograd.grad(v.sum(), s)
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_squash_matches_the_papers_first_form():
    s = torch.randn(7, 5, dtype=torch.float64)
    norm_squared = (s * s).sum(-1, keepdim=True)
    paper = norm_squared / (1 + norm_squared) * s / norm_squared.sqrt()
    torch.testing.assert_close(reference.squash(s), paper)


def test_detach_changes_gradients_not_values():
    u, weight, bias = _inputs()
    weight.requires_grad_()
    attached = reference.dynamic_routing(u, weight, bias, iterations=3)
    detached = reference.dynamic_routing(u, weight, bias, iterations=3, detach_routing=True)
    torch.testing.assert_close(attached, detached, rtol=0, atol=0)
    grad_attached = torch.autograd.grad(attached.sum(), weight)[0]
    grad_detached = torch.autograd.grad(detached.sum(), weight)[0]
    assert not torch.allclose(grad_attached, grad_detached)


@pytest.mark.parametrize("iterations", [1, 3])
def test_leaky_routing_is_routing_with_a_zero_orphan_parent(iterations):
    """Leaky routing's extra zero logit is an output capsule whose weights and bias are zero:
    its votes are 0, so its logit stays 0 and it only takes a share of each coupling."""
    u, weight, bias, _ = make_inputs(RoutingShape(3, 37, 5, 4, 6), 0, bias=True)
    v = reference.dynamic_routing(u, weight, bias, iterations, leaky=True)
    with_orphan = reference.dynamic_routing(u, torch.cat([weight, torch.zeros_like(weight[:1])]),
                                            torch.cat([bias, torch.zeros_like(bias[:1])]), iterations)
    torch.testing.assert_close(v, with_orphan[:, :4], rtol=1e-14, atol=1e-15)
    _, couplings = reference.dynamic_routing(u, weight, bias, iterations, leaky=True, return_couplings=True)
    assert torch.all(couplings[0] == 1 / 5) and torch.all(couplings[-1].sum(dim=2) < 1)
