"""examples/drop_in.py: a public-style CapsNet gives the same numbers after its DigitCaps
is swapped for fastcaps.DigitCaps with the same weights, and so does its DigitCaps alone."""

import copy
import importlib.util
import os

import pytest
import torch

import fastcaps

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "drop_in.py")
_spec = importlib.util.spec_from_file_location("drop_in_example", _PATH)
drop_in = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drop_in)

BACKENDS = [b for b in fastcaps.available_backends("cpu") if b != "triton"]  # interpreter: too slow here


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_model_gives_the_same_outputs(backend):
    length_error, reconstruction_error = drop_in.compare(backend, batch=3, seed=1)
    assert length_error < 1e-5 and reconstruction_error < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_model_trains_the_same(backend):
    torch.manual_seed(2)
    theirs = drop_in.PublicCapsNet()
    ours = drop_in.swap_in_fastcaps(copy.deepcopy(theirs), backend)
    images = torch.rand(2, 1, 28, 28)
    for model in (theirs, ours):
        lengths, reconstruction = model(images)
        (lengths.square().sum() + reconstruction.sum()).backward()
    torch.testing.assert_close(ours.conv_layer.weight.grad, theirs.conv_layer.weight.grad, rtol=1e-4, atol=1e-6)
    converted = fastcaps.convert_weight(theirs.digit_capsules.W.grad, "1 in_caps out_caps out_dim in_dim")
    torch.testing.assert_close(ours.digit_capsules.weight.grad, converted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_replacement_with_imported_weights(backend):
    torch.manual_seed(0)
    theirs = drop_in.PublicDigitCaps(num_capsules=10, num_routes=72, in_channels=8, out_channels=16)
    ours = fastcaps.DigitCaps(in_caps=72, in_dim=8, out_caps=10, out_dim=16, backend=backend)
    with torch.no_grad():
        ours.weight.copy_(fastcaps.convert_weight(theirs.W, "1 in_caps out_caps out_dim in_dim"))
    u = fastcaps.squash(torch.randn(4, 72, 8))
    torch.testing.assert_close(ours(u), theirs(u), rtol=1e-5, atol=1e-6)
