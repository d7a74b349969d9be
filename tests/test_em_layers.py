"""The matrix-capsule API: functional EM routing, the layers, the spread loss and MatrixCapsNet."""

import pytest
import torch

import fastcaps
from fastcaps import reference


def grid_inputs(seed, batch=2, in_caps=3, side=4, height=6, width=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, in_caps, side, side, height, width, generator=g),
            torch.rand(batch, in_caps, height, width, generator=g))


def test_primary_mat_caps_views_the_convolution():
    layer = fastcaps.PrimaryMatCaps(7, 5, pose_size=3)
    x = torch.randn(2, 7, 6, 4)
    poses, activations = layer(x)
    assert poses.shape == (2, 5, 3, 3, 6, 4) and activations.shape == (2, 5, 6, 4)
    features = layer.conv(x)
    torch.testing.assert_close(poses[:, 2, 1, 0], features[:, 2 * 9 + 1 * 3 + 0])
    torch.testing.assert_close(activations, torch.sigmoid(features[:, 45:]))
    assert poses.data_ptr() == poses.untyped_storage().data_ptr()      # a view, no copy


def test_conv_mat_caps_calls_the_functional_form():
    layer = fastcaps.ConvMatCaps2d(3, 4, kernel_size=(3, 2), stride=(2, 1), padding=1, iterations=2,
                                   inverse_temperature=[0.5, 1.0], backend="reference")
    poses, activations = grid_inputs(0)
    out_poses, out_acts = layer(poses, activations)
    assert out_poses.shape == (2, 4, 4, 4, 3, 6) and out_acts.shape == (2, 4, 3, 6)
    ref = reference.conv_em_routing(poses, activations, layer.weight, layer.beta_u, layer.beta_a, 2, (2, 1), 1,
                                    inverse_temperature=[0.5, 1.0])
    torch.testing.assert_close(out_poses, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out_acts, ref[1], rtol=0, atol=0)
    assert {name for name, _ in layer.named_parameters()} == {"weight", "beta_u", "beta_a"}
    assert layer.weight.shape == (4, 3, 3, 2, 4, 4)
    assert "normalization='per_child'" in repr(layer)


def test_class_mat_caps_adds_coordinates():
    layer = fastcaps.ClassMatCaps(3, 5)
    poses, activations = grid_inputs(1)
    out = layer(poses, activations)
    assert out[0].shape == (2, 5, 4, 4) and out[1].shape == (2, 5)
    plain = fastcaps.em_routing(poses, activations, layer.weight, layer.beta_u, layer.beta_a, 3)
    assert (out[1] - plain[1]).abs().max() > 0                          # the coordinates changed the votes
    with pytest.raises(ValueError, match="coordinate_addition needs pose_size >= 2"):
        fastcaps.ClassMatCaps(3, 5, pose_size=1)


def test_layers_stack_and_train():
    torch.manual_seed(2)
    model = fastcaps.MatrixCapsNet(A=8, B=4, C=4, D=4, num_classes=3, iterations=2)
    images, labels = torch.randn(3, 1, 28, 28), torch.tensor([0, 2, 1])
    out = model(images)
    assert out.activations.shape == (3, 3) and out.poses.shape == (3, 3, 4, 4)
    loss = fastcaps.SpreadLoss()(out.activations, labels)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _routing_parameters(types_in, types_out, kernel=9, pose=16):
    return kernel * types_in * types_out * pose + 2 * types_out


@pytest.mark.parametrize("sizes,paper", [(dict(A=32, B=32, C=32, D=32), 310_000),
                                         (dict(A=64, B=8, C=16, D=16), 68_000)])
def test_matrix_capsnet_parameter_counts(sizes, paper):
    a, b, c, d = sizes["A"], sizes["B"], sizes["C"], sizes["D"]
    expected = ((5 * 5 * 1 * a + a)                       # ReLU Conv1, 5x5
                + (a * b * 17 + b * 17)                   # PrimaryCaps, 1x1: 16 pose entries + 1 activation
                + _routing_parameters(b, c)               # ConvCaps1, K = 3: W per offset, type pair; beta_u, beta_a
                + _routing_parameters(c, d)               # ConvCaps2
                + _routing_parameters(d, 5, kernel=1))    # class capsules: W per type
    model = fastcaps.MatrixCapsNet(**sizes)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    # The paper states its counts rounded ("310K", "68K"); ours lie within 2.5 % of them.
    assert abs(count / paper - 1) < 0.025, count


def test_spread_loss_values_and_schedule():
    a = torch.tensor([[0.9, 0.3, 0.8], [0.1, 0.2, 0.7]], requires_grad=True)
    labels = torch.tensor([0, 2])
    m = 0.2
    expected = ((max(0, m - 0.6) ** 2 + max(0, m - 0.1) ** 2) + (max(0, m - 0.6) ** 2 + max(0, m - 0.5) ** 2)) / 2
    torch.testing.assert_close(fastcaps.spread_loss(a, labels, m), torch.tensor(expected))
    loss = fastcaps.SpreadLoss(0.2, 0.9, steps=7)
    margins = []
    for _ in range(9):
        margins.append(loss.margin)
        loss.step()
    assert margins[0] == pytest.approx(0.2) and margins[7] == pytest.approx(0.9) and margins[8] == pytest.approx(0.9)
    assert margins[3] == pytest.approx(0.2 + 0.7 * 3 / 7)
    resumed = fastcaps.SpreadLoss(0.2, 0.9, steps=7)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.margin == loss.margin
    per_sample = fastcaps.spread_loss(a, labels, 0.9, reduction="none")
    assert per_sample.shape == (2,)
    per_sample.sum().backward()
    assert torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="labels must lie in"):
        fastcaps.spread_loss(a, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="target must be integer class labels"):
        fastcaps.spread_loss(a, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fastcaps.SpreadLoss(steps=0)


def test_functional_forms_match_the_reference_and_half_inputs_compute_in_float32():
    poses, activations = grid_inputs(3)
    layer = fastcaps.ConvMatCaps2d(3, 2, normalization="per_window")
    args = (poses, activations, layer.weight.detach(), layer.beta_u.detach(), layer.beta_a.detach())
    out = fastcaps.conv_em_routing(*args, 3, normalization="per_window", backend="reference")
    ref = reference.conv_em_routing(*args, 3, normalization="per_window")
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(fastcaps.conv_em_routing(*args, 3, normalization="per_window")[0], ref[0])
    half = fastcaps.conv_em_routing(*[t.to(torch.bfloat16) for t in args], 3)
    assert half[0].dtype == torch.bfloat16 and torch.isfinite(half[1].float()).all()
    votes = torch.randn(2, 3, 7, 4, 16)
    mu, a = fastcaps.em_route_votes(votes, torch.rand(2, 3, 7), torch.zeros(4), torch.zeros(4), 2)
    assert mu.shape == (2, 3, 4, 16) and a.shape == (2, 3, 4)


def test_backends_without_an_em_kernel_say_so():
    poses, activations = grid_inputs(4)
    layer = fastcaps.ConvMatCaps2d(3, 2, backend="triton")
    with pytest.raises(ValueError, match="conv_em_routing: backend='triton' has no kernel for em_routing yet; "
                                         "expected one of 'reference', 'torch', 'cpu'"):
        layer(poses, activations)


def test_auto_runs_without_a_warning(recwarn):
    poses, activations = grid_inputs(5)
    fastcaps.ClassMatCaps(3, 4)(poses, activations)
    assert not [w for w in recwarn if "fastcaps" in str(w.message)]


def test_module_errors_name_the_argument():
    with pytest.raises(ValueError, match="ConvMatCaps2d: out_caps must be an int >= 1"):
        fastcaps.ConvMatCaps2d(3, 0)
    with pytest.raises(ValueError, match="ConvMatCaps2d: normalization must be"):
        fastcaps.ConvMatCaps2d(3, 2, normalization="global")
    with pytest.raises(ValueError, match="ConvMatCaps2d: inverse_temperature has 2 values"):
        fastcaps.ConvMatCaps2d(3, 2, iterations=3, inverse_temperature=[1.0, 2.0])
    with pytest.raises(ValueError, match="MatrixCapsNet: A must be an int >= 1"):
        fastcaps.MatrixCapsNet(A=0)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(6)
    model = fastcaps.MatrixCapsNet(A=4, B=3, C=3, D=3, num_classes=2, iterations=2)
    images = torch.randn(2, 1, 28, 28)
    eager = model(images)
    compiled = torch.compile(model, fullgraph=True)(images)
    torch.testing.assert_close(compiled.activations, eager.activations, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.poses, eager.poses, rtol=1e-4, atol=1e-5)
