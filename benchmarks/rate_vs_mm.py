"""The C++ kernels' arithmetic rate against torch.mm's, round by round in one process.

    python benchmarks/rate_vs_mm.py [--batch 128] [--mode forward+backward] [--rounds 30]

`fastcaps bench` measures torch.mm once per run (median of 5) and reads every GFLOP/s
against it; on these VMs that one figure moved from 79 to 182 GFLOP/s between runs on the
same CPU model, which moves the rate bar of issue 17 (25 % of torch.mm) more than any
kernel change. Here each round times one call of the kernel (MNIST DigitCaps, r = 3, the
`cpu` backend, whatever build FASTCAPS_CPU_ISA selects) and one torch.mm of two 2048 x
2048 matrices, alternating, and takes the ratio of the two rates in that round; printed:
the median ratio with its quartiles, and each rate's median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastcaps.cases import RoutingShape
from fastcaps.kernels.cpu import extension
from fastcaps.tools.bench.report import round_ratios
from fastcaps.tools.bench.workloads import Dense

MM_SIZE = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=("forward", "forward+backward"), default="forward+backward")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    shape = RoutingShape(args.batch, 1152, 8, 10, 16)
    dense = Dense()
    u, weight = dense.inputs(shape, seed=0, dtype=torch.float32, device="cpu")
    route = dense.route("cpu", shape)
    if args.mode == "forward+backward":
        u.requires_grad_(True)
        weight.requires_grad_(True)

    def kernel_call():
        v = route(u, weight, 3)
        if args.mode == "forward+backward":
            torch.autograd.grad(v.sum(), (u, weight))

    a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
    kernel_flops = dense.flops(shape, 3, args.mode)
    mm_flops = 2 * MM_SIZE**3

    def timed(call):
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    for _ in range(3):  # warm-up: the extension, the allocator, the mm's threads
        kernel_call()
        torch.mm(a, b)
    kernel_seconds, mm_seconds = [], []
    for _ in range(args.rounds):
        kernel_seconds.append(timed(kernel_call))
        mm_seconds.append(timed(lambda: torch.mm(a, b)))
    kernel_rates = [kernel_flops / t / 1e9 for t in kernel_seconds]
    mm_rates = [mm_flops / t / 1e9 for t in mm_seconds]
    # The rates' ratio in a round is the times' ratio scaled by the two flop counts.
    med, q1, q3 = (kernel_flops / mm_flops * x for x in round_ratios(mm_seconds, kernel_seconds))
    print(f"MNIST DigitCaps B = {args.batch}, r = 3, {args.mode}, float32, {torch.get_num_threads()} threads, "
          f"C++ kernels: the {extension.isa()} build, {args.rounds} alternating rounds")
    print(f"kernel rate (DESIGN.md section 6's count): median {statistics.median(kernel_rates):.1f} GFLOP/s")
    print(f"torch.mm {MM_SIZE} x {MM_SIZE}: median {statistics.median(mm_rates):.1f} GFLOP/s "
          f"(min {min(mm_rates):.1f}, max {max(mm_rates):.1f})")
    print(f"kernel / torch.mm, round by round: {100 * med:.1f} % [{100 * q1:.1f}, {100 * q3:.1f}]")


if __name__ == "__main__":
    main()
