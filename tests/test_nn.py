"""Modules: torch.nn conventions, the paper's CapsNet, torch.compile, weight import."""

import pytest
import torch
from torch import nn

import fastcaps
from fastcaps import reference

# "triton" runs under the interpreter here, too slow for these shapes: test_triton_kernels.py.
BACKENDS = [b for b in fastcaps.available_backends("cpu") if b != "triton"]


def test_digitcaps_shapes_repr_and_factory_kwargs():
    caps = fastcaps.DigitCaps(in_caps=7, in_dim=3, out_caps=4, out_dim=5, dtype=torch.float64)
    assert caps.weight.shape == (4, 7, 5, 3) and caps.weight.dtype == torch.float64
    assert caps.bias is None and [name for name, _ in caps.named_parameters()] == ["weight"]
    assert "in_caps=7" in repr(caps) and "bias=False" in repr(caps)
    assert caps(torch.randn(2, 7, 3, dtype=torch.float64)).shape == (2, 4, 5)
    with_bias = fastcaps.DigitCaps(7, 3, 4, 5, bias=True, device="meta")
    assert with_bias.bias.shape == (4, 5) and with_bias.weight.is_meta


def test_digitcaps_rejects_bad_sizes():
    with pytest.raises(ValueError, match="in_caps must be an int >= 1"):
        fastcaps.DigitCaps(in_caps=0)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        fastcaps.DigitCaps(iterations=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_digitcaps_module_matches_functional(backend):
    caps = fastcaps.DigitCaps(in_caps=9, in_dim=4, out_caps=3, out_dim=6, bias=True, iterations=2,
                              detach_routing=True, backend=backend)
    nn.init.normal_(caps.bias)
    u = torch.randn(5, 9, 4)
    expected = reference.dynamic_routing(u, caps.weight, caps.bias, 2, True)
    torch.testing.assert_close(caps(u), expected, rtol=1e-5, atol=1e-6)


def test_initialisation_starts_output_lengths_near_one_half():
    torch.manual_seed(0)
    caps = fastcaps.DigitCaps(iterations=1)  # MNIST shape
    directions = torch.randn(64, 1152, 8)
    u = directions / directions.norm(dim=-1, keepdim=True)
    assert 0.4 < caps(u).norm(dim=-1).mean().item() < 0.6
    # Three iterations of agreement lengthen them, but leave them short of saturation.
    caps.iterations = 3
    assert caps(u).norm(dim=-1).max().item() < 0.9
    # What the docstring says std = 1 does: every capsule saturates.
    nn.init.normal_(caps.weight, std=1.0)
    assert caps(u).norm(dim=-1).min().item() > 0.95


def test_primarycaps_ordering_is_channel_major():
    primary = fastcaps.PrimaryCaps(in_channels=2, caps_channels=3, caps_dim=4, kernel_size=3, stride=2)
    x = torch.randn(1, 2, 9, 9)
    capsules = primary(x)
    features = primary.conv(x)  # (1, 3 * 4, 4, 4)
    assert capsules.shape == (1, 3 * 4 * 4, 4)
    k, h, w = 2, 1, 3
    expected = reference.squash(features[0, k * 4:(k + 1) * 4, h, w])
    torch.testing.assert_close(capsules[0, (k * 4 + h) * 4 + w], expected)


def _parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def test_capsnet_parameter_counts_match_the_paper():
    model = fastcaps.CapsNet(device="meta")
    assert _parameter_count(model) == 8_215_568
    assert _parameter_count(fastcaps.CapsNet(reconstruction=False, device="meta")) == 6_804_224


@pytest.mark.parametrize("backend", BACKENDS)
def test_capsnet_forward_backward_on_28x28(backend):
    torch.manual_seed(0)
    model = fastcaps.CapsNet(backend=backend)
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    output = model(images, labels)
    assert output.lengths.shape == (2, 10) and output.capsules.shape == (2, 10, 16)
    assert output.reconstruction.shape == (2, 1, 28, 28)
    loss = fastcaps.CapsuleLoss()(output, images, labels)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_capsnet_masks_by_label_in_training_and_by_longest_otherwise():
    torch.manual_seed(0)
    model = fastcaps.CapsNet(image_size=20, num_classes=4, conv_channels=8, primary_channels=2)
    images = torch.rand(3, 1, 20, 20)
    labels = torch.tensor([0, 1, 2])
    trained = model.train()(images, labels)
    masked = trained.capsules * torch.nn.functional.one_hot(labels, 4).unsqueeze(-1)
    torch.testing.assert_close(trained.reconstruction.flatten(1), model.decoder(masked.flatten(1)))
    evaluated = model.eval()(images, labels)
    longest = torch.nn.functional.one_hot(evaluated.lengths.argmax(1), 4).unsqueeze(-1)
    torch.testing.assert_close(evaluated.reconstruction.flatten(1), model.decoder((evaluated.capsules * longest).flatten(1)))


def test_capsnet_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 28, 28\)"):
        fastcaps.CapsNet(device="meta")(torch.rand(2, 28, 28, device="meta"))


# Every backend, "triton" too: this model's DigitCaps is small enough for the interpreter.
@pytest.mark.parametrize("backend", fastcaps.available_backends("cpu"))
def test_compiled_model_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = fastcaps.CapsNet(image_size=20, num_classes=5, conv_channels=16, primary_channels=4,
                             routing_bias=True, backend=backend)
    images, labels = torch.rand(3, 1, 20, 20), torch.tensor([0, 4, 2])
    loss_fn = fastcaps.CapsuleLoss()

    def step(m):
        m.zero_grad()
        output = m(images, labels)
        loss = loss_fn(output, images, labels)
        loss.backward()
        return output.lengths.detach(), [p.grad.clone() for p in m.parameters()]

    eager_lengths, eager_grads = step(model)
    compiled_lengths, compiled_grads = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled_lengths, eager_lengths, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_convert_weight_layouts_and_errors():
    weight = torch.randn(10, 12, 8, 16)  # (J, I, Din, D)
    converted = fastcaps.convert_weight(weight, "out_caps in_caps in_dim out_dim")
    assert converted.shape == (10, 12, 16, 8) and torch.equal(converted, weight.transpose(2, 3))
    with pytest.raises(ValueError, match="must name each of"):
        fastcaps.convert_weight(weight, "out_caps in_caps in_dim in_dim")
    with pytest.raises(ValueError, match="names 5 axes but weight has 4"):
        fastcaps.convert_weight(weight, "1 out_caps in_caps in_dim out_dim")
    with pytest.raises(ValueError, match="axis 0 is marked '1' but has size 2"):
        fastcaps.convert_weight(torch.randn(2, 3, 4, 5, 6), "1 out_caps in_caps in_dim out_dim")


def test_convert_weight_imports_an_unfold_based_convolutional_layer():
    """A public-style conv capsule layer: F.unfold's windows permuted from (i, kh, kw) to
    (kh, kw, i), votes from W (K*K*I, J*D, Din), routed; ConvCaps2d with the converted W agrees."""
    batch, in_caps, in_dim, size, out_caps, out_dim, k = 2, 3, 4, 5, 4, 6, 3
    u = fastcaps.squash(torch.randn(batch, in_caps, in_dim, size, size, dtype=torch.float64), dim=2)
    theirs = torch.randn(k * k * in_caps, out_caps * out_dim, in_dim, dtype=torch.float64) * 0.4
    columns = torch.nn.functional.unfold(u.reshape(batch, in_caps * in_dim, size, size), k, padding=1)
    positions = columns.shape[-1]
    windows = columns.view(batch, in_caps, in_dim, k, k, positions).permute(0, 5, 3, 4, 1, 2)
    windows = windows.reshape(batch, positions, k * k * in_caps, in_dim)
    votes = torch.einsum("rce,bpre->bprc", theirs, windows).view(batch, positions, k * k * in_caps, out_caps, out_dim)
    want = fastcaps.reference.route_votes(votes, None, 3).permute(0, 2, 3, 1).reshape(batch, out_caps, out_dim, size,
                                                                                       size)
    layer = fastcaps.ConvCaps2d(in_caps, in_dim, out_caps, out_dim, k, padding=1, dtype=torch.float64)
    layer.weight.data.copy_(fastcaps.convert_weight(theirs, "(kh kw in_caps) (out_caps out_dim) in_dim", kh=k, kw=k,
                                                    out_caps=out_caps))
    torch.testing.assert_close(layer(u), want, rtol=1e-12, atol=1e-13)
    for layout, sizes, message in [
        ("(kh kw in_caps) (out_caps out_dim) in_dim", dict(kh=k), "give the sizes of all but one"),
        ("(kh kw in_caps) (out_caps out_dim) in_dim", dict(kh=2, kw=k, out_caps=out_caps), "does not make"),
        ("(kh kw in_caps) (out_caps out_dim) in_dim", dict(kh=k, kw=k, out_caps=out_caps, depth=2), "does not name"),
        ("(kh kw in_caps (out_caps) out_dim in_dim", dict(), "parenthesised groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            fastcaps.convert_weight(theirs, layout, **sizes)
