"""pytest-benchmark suites for fastcaps: `pytest benchmarks/ --benchmark-only`.

Kept out of the default test run (pyproject's testpaths is tests/). Timing runs with the
same steady-state allocator as `fastcaps bench` (see fastcaps/tools/bench/engine.py); the reference's
median of each group is kept here so every other provider records its speed-up.
"""

import pytest

from fastcaps.tools.bench import engine as bench


def pytest_configure(config):
    bench.steady_state_allocator()


@pytest.fixture(scope="session")
def reference_results():
    """group label -> the reference's (median seconds, peak bytes) in this session."""
    return {}
