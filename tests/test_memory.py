"""The memory method measures what it should, and the "torch" kernel saves memory."""

import pytest

from fastcaps.memory import Workload, peak_growth


def test_torch_kernel_uses_a_fraction_of_the_references_memory():
    reference = peak_growth(Workload("reference", "forward+backward", batch=128))
    fused = peak_growth(Workload("torch", "forward+backward", batch=128))
    # u_hat alone is 128 * 1152 * 10 * 16 * 4 bytes = 94 MB; autograd keeps several.
    assert reference > 3 * 94e6
    assert fused < reference / 4


def test_torch_kernel_memory_stays_flat_beyond_one_chunk():
    # The kernel holds u_hat for about 22 MNIST samples at a time, whatever the batch.
    at_32 = peak_growth(Workload("torch", "forward+backward", batch=32))
    at_128 = peak_growth(Workload("torch", "forward+backward", batch=128))
    assert at_128 < 1.25 * at_32


def test_peak_grows_with_the_batch_for_the_reference():
    small = peak_growth(Workload("reference", "forward", batch=8))
    large = peak_growth(Workload("reference", "forward", batch=32))
    assert large == pytest.approx(4 * small, rel=0.35)
