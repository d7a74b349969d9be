"""Routing speed and memory per case, batch, depth and mode, every provider side by side.

    pytest benchmarks/ --benchmark-only                         # the whole grid (51 min on 2 cores)
    pytest benchmarks/ --benchmark-only -k "mnist and B128"     # one slice
    pytest benchmarks/ --benchmark-only --benchmark-json out.json

Each group (pytest-benchmark groups by it by default) is one (case, B, r, mode,
dtype); its members are the providers. extra_info carries GFLOP/s (DESIGN.md section 6
counts), the speed-up over the reference measured in this session, peak memory growth
(fresh process, see fastcaps.tools.bench.engine.peak_memory) and the first call's time (compilation
for the compiled reference).
"""

import os
import time

import pytest
import torch

from fastcaps.cases import RoutingShape
from fastcaps.tools.bench import engine as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = ["float32", "float16", "bfloat16"] if DEVICE == "cuda" else ["float32"]
POINTS = [
    point
    for dtype in DTYPES
    for point in bench.points([name for name, shape in bench.CASES.items() if isinstance(shape, RoutingShape)],
                              [1, 32, 128, 512], [1, 3, 5], list(bench.MODES),
                              bench.providers(DEVICE), dtype, DEVICE)
]


def _fits(point: bench.Point) -> bool:
    """The reference keeps about five u_hat-sized tensors for forward+backward."""
    shape = point.shape
    u_hat_bytes = shape.batch * shape.in_caps * shape.out_caps * shape.out_dim * 4
    if point.device == "cuda":
        available = torch.cuda.get_device_properties(0).total_memory
    else:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 5 * u_hat_bytes < 0.5 * available


def _rounds(runner: bench.Runner) -> int:
    """About one second of timed calls, between 3 and 30 of them."""
    started = time.perf_counter()
    runner.run()
    return max(3, min(30, int(1.0 / max(time.perf_counter() - started, 1e-6))))


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p.label} {p.provider}".replace(" ", "-"))
def test_routing(benchmark, point, reference_results):
    if not _fits(point):
        pytest.skip(f"{point.label}: the reference would not fit in memory here")
    runner = bench.make_runner(point)
    benchmark.group = point.label
    benchmark.pedantic(runner.run, rounds=_rounds(runner), warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    peak = bench.peak_memory(point)
    if point.provider == "reference":
        reference_results[point.label] = (median, peak)
    reference_median, reference_peak = reference_results.get(point.label, (None, None))
    benchmark.extra_info.update({
        "provider": point.provider,
        "gflops": bench.flops(point.shape, point.iterations, point.mode) / median / 1e9,
        "speedup_vs_reference": None if reference_median is None else reference_median / median,
        "peak_mib": peak / 2**20,
        "memory_vs_reference": None if not reference_peak else peak / reference_peak,
        "first_call_s": runner.first_call_seconds,
    })
