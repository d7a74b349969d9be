"""Where the C++ route_votes kernels spend their time, at bench case votes (B = 8: 392 rows of
288 x 32 x 16D votes, float32): forward and backward at r = 3 and r = 1 (the difference is
what the passes cost; r = 1 is mostly the transposes of the votes into lanes), beside a copy and
a sum of the votes (what moving them costs on this machine) and torch.compile of the
reference's forward. Medians of 5 calls after a warm-up, the bench's steady-state allocator
(glibc keeps freed memory: without it every fresh 231 MB buffer pays its page faults).

    python benchmarks/votes_costs.py
"""

from __future__ import annotations

import statistics
import time

import torch

from fastcaps import reference
from fastcaps.kernels.cpu import route_votes as cpu_votes
from fastcaps.tools.bench import engine


def median_ms(call, calls: int = 5) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    engine.steady_state_allocator()
    torch.manual_seed(0)
    votes = torch.randn(8 * 49, 288, 32, 16) / 4
    grad_v = torch.randn(8 * 49, 32, 16)
    for iterations in (3, 1):
        _, s = cpu_votes.votes_forward(votes, None, iterations, False)
        forward = median_ms(lambda: cpu_votes.votes_forward(votes, None, iterations, False))
        backward = median_ms(lambda: cpu_votes.votes_backward(grad_v, votes, s, iterations, False, False))
        print(f"cpu forward  r = {iterations}: {forward:7.1f} ms")
        print(f"cpu backward r = {iterations}: {backward:7.1f} ms")
    print(f"votes.clone():      {median_ms(votes.clone):7.1f} ms")
    print(f"votes.sum():        {median_ms(votes.sum):7.1f} ms")
    compiled = torch.compile(reference.route_given_votes)
    grid = votes.view(8, 49, 288, 32, 16)
    print(f"compiled reference forward r = 3: {median_ms(lambda: compiled(grid, None, 3)):7.1f} ms")


if __name__ == "__main__":
    main()
