"""The peak-memory method measures what it should, and the "torch" kernel saves memory."""

import pytest

from fastcaps.tools.bench.engine import CASES, Point, peak_memory

MNIST = CASES["mnist"]


def _peak(provider, mode, batch):
    return peak_memory(Point("mnist", MNIST.with_batch(batch), 3, mode, provider))


def test_torch_kernel_uses_a_fraction_of_the_references_memory():
    reference = _peak("reference", "forward+backward", 128)
    fused = _peak("torch", "forward+backward", 128)
    # u_hat alone is 128 * 1152 * 10 * 16 * 4 bytes = 94 MB; autograd keeps several.
    assert reference > 3 * 94e6
    assert fused < reference / 4


def test_torch_kernel_memory_stays_flat_beyond_one_chunk():
    # The kernel holds u_hat for about 22 MNIST samples at a time, whatever the batch.
    assert _peak("torch", "forward+backward", 128) < 1.25 * _peak("torch", "forward+backward", 32)


def test_peak_grows_with_the_batch_for_the_reference():
    small = _peak("reference", "forward", 8)
    large = _peak("reference", "forward", 32)
    assert large == pytest.approx(4 * small, rel=0.35)
