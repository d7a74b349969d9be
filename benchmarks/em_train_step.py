"""One MatrixCapsNet training step (forward, spread loss, backward, Adam step) on each EM
backend, timed in interleaved rounds in one process, with each step's peak memory growth measured
in a fresh process (as ``fastcaps bench`` does), and the EM layers' arithmetic rate against
torch.mm timed alternately with the steps.

    python benchmarks/em_train_step.py --batch 16 --rounds 9

The model is the paper's small variant (A = 64, B = 8, C = D = 16) on 32 x 32 smallNORB-sized
crops, 5 classes, r = 3, lambda 0.01, per-child normalisation: ConvCaps1 (8 -> 16 types, 3x3,
stride 2, 14 x 14 -> 6 x 6), ConvCaps2 (16 -> 16, 3x3, 6 x 6 -> 4 x 4), class capsules (16 x 16
positions -> 5, coordinate addition). The EM floor counts the bench's arithmetic per routing
(fastcaps/tools/bench/workloads.py, ``EM.flops``), forward+backward as three times the forward;
the convolutions and the optimiser are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import fastcaps
from fastcaps.cases import EMShape
from fastcaps.tools.bench import report
from fastcaps.tools.bench.workloads import EM

SIZES = dict(A=64, B=8, C=16, D=16)


def em_layers(batch: int):
    """The EM routings of one forward at these sizes, as the bench's shapes."""
    return [EMShape(batch, SIZES["B"], SIZES["C"], (14, 14), 4, (3, 3), (2, 2)),
            EMShape(batch, SIZES["C"], SIZES["D"], (6, 6), 4, (3, 3), (1, 1)),
            EMShape(batch, SIZES["D"], 5, (4, 4), 4, coordinate_addition=True)]


def make_step(backend: str, batch: int):
    torch.manual_seed(0)
    model = fastcaps.MatrixCapsNet(in_channels=1, num_classes=5, backend=backend, **SIZES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = fastcaps.SpreadLoss()
    images, labels = torch.rand(batch, 1, 32, 32), torch.randint(0, 5, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images).activations, labels).backward()
        optimizer.step()
    return step


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def memory_worker(backend: str, batch: int) -> None:
    step = make_step(backend, batch)
    step()  # warm-up: lazy initialisation, Adam's state
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak RSS to the current RSS
    before = _kib("VmRSS")
    step()
    print(json.dumps((_kib("VmHWM") - before) / 1024))


def peak_mib(backend: str, batch: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--memory-worker", backend, "--batch", str(batch)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", action="append", help="repeatable; default: reference, torch, cpu")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.batch)
    backends = args.backend or [b for b in ("reference", "torch", "cpu") if b in fastcaps.available_backends()]
    steps = {name: make_step(name, args.batch) for name in backends}
    for step in steps.values():
        for _ in range(1 + args.warmup):
            step()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = {name: [] for name in (*steps, "mm")}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        torch.mm(a, b)
        seconds["mm"].append(time.perf_counter() - started)
    em_flops = sum(EM().flops(shape, 3, "forward+backward") for shape in em_layers(args.batch))
    mm_flops = 2 * 2048 ** 3
    print(f"MatrixCapsNet (A, B, C, D = 64, 8, 16, 16) training step, batch {args.batch}, r = 3, per_child, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} interleaved rounds; "
          f"C++ build {fastcaps.kernels.cpu.extension.isa()}")
    print(f"  torch.mm 2048^2: median {mm_flops / statistics.median(seconds['mm']) / 1e9:.1f} GFLOP/s")
    for name in steps:
        median = statistics.median(seconds[name])
        ratio, q1, q3 = report.round_ratios(seconds["reference"], seconds[name]) if "reference" in steps else (0, 0, 0)
        # (EM floor / step time) / (mm flops / mm time) of the same round
        rate, r1, r3 = report.round_ratios([s * em_flops for s in seconds["mm"]], [s * mm_flops for s in seconds[name]])
        print(f"  {name:>9}: median {1e3 * median:8.1f} ms, reference / this per round {ratio:.2f}x "
              f"[{q1:.2f}, {q3:.2f}], EM floor {em_flops / median / 1e9:.1f} GFLOP/s = {100 * rate:.1f} % "
              f"[{100 * r1:.1f}, {100 * r3:.1f}] of torch.mm, peak {peak_mib(name, args.batch):.1f} MiB")


if __name__ == "__main__":
    main()
