"""The C++ backward at small batches with and without the forward's kept u_hat.

    python benchmarks/small_batch_backward.py [--batch 1 --batch 4] [--rounds 200]

Both backwards run on the same forward's outputs, in alternating order, each call right
after a forward+backward of torch.compile(reference) on its own inputs, as `fastcaps bench`
interleaves providers: W then comes from wherever the other work left it. A ratio is taken
per round (recomputing / kept); the script prints medians and the quartiles of the ratios.
MNIST DigitCaps shape, float32, r = 3, the steady-state allocator.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastcaps.kernels.cpu import dynamic_routing as cpu_kernels
from fastcaps.tools.bench import engine as bench
from fastcaps.tools.bench import report


def measure(batch: int, rounds: int) -> str:
    point = bench.Point("mnist", bench.CASES["mnist"].with_batch(batch), 3, "forward+backward", "reference-compiled")
    compiled = bench.make_runner(point)
    u, weight = bench.point_inputs(point, seed=1)
    v, s, kept_u_hat = cpu_kernels.routing_forward(u, weight, None, 3, False, False)
    assert kept_u_hat.numel() > 0, "this batch keeps no u_hat"
    grad_v = torch.ones_like(v)
    variants = {
        "kept": lambda: cpu_kernels.routing_backward(grad_v, u, weight, None, s, kept_u_hat, 3, False, False),
        "recomputing": lambda: cpu_kernels.routing_backward(grad_v, u, weight, None, s, kept_u_hat[:0], 3, False, False),
    }
    names = list(variants)
    for name in names:  # warm-up, not kept
        variants[name]()
    samples = bench.interleaved_rounds([variants[name] for name in names], rounds, before_each=compiled.run)
    seconds = dict(zip(names, samples))
    median, q1, q3 = report.round_ratios(seconds["recomputing"], seconds["kept"])
    return (f"B={batch}: backward kept {statistics.median(seconds['kept']) * 1e3:.3f} ms, "
            f"recomputing {statistics.median(seconds['recomputing']) * 1e3:.3f} ms; "
            f"recomputing / kept median {median:.2f}x [{q1:.2f}, {q3:.2f}] over {rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    bench.steady_state_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch in args.batch or [1, 4]:
        print(measure(batch, args.rounds))


if __name__ == "__main__":
    main()
