"""What torch.compile adds on top of the fused kernels: one CapsNet training step (forward,
CapsuleLoss, backward, Adam step), eager against ``torch.compile(model, fullgraph=True)``,
timed in interleaved rounds in one process.

    python benchmarks/compile_step.py --backend cpu --batch 32 --rounds 15

The routing op is opaque to the compiler (a custom op), so compile can only fuse what is
around it: the convolutions' ReLU, PrimaryCaps' squash, the lengths, the mask and decoder,
the loss.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastcaps
from fastcaps.tools.bench import report


def step_function(model, optimizer, images, labels):
    loss_fn = fastcaps.CapsuleLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        output = model(images, labels)
        loss_fn(output, images, labels).backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    steps = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = fastcaps.CapsNet(backend=args.backend)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        runner = torch.compile(model, fullgraph=True) if name == "compiled" else model
        steps[name] = step_function(runner, optimizer, images, labels)
        started = time.perf_counter()
        steps[name]()
        print(f"{name}: first step {time.perf_counter() - started:.1f} s", flush=True)
        for _ in range(args.warmup):
            steps[name]()
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    median, q1, q3 = report.round_ratios(seconds["eager"], seconds["compiled"])
    print(f"CapsNet training step, backend {args.backend!r}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} interleaved rounds")
    for name, values in seconds.items():
        print(f"  {name:>8}: median {1e3 * statistics.median(values):7.1f} ms")
    print(f"  eager / compiled: {median:.3f}x (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
