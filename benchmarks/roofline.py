"""The Triton kernels' roofline at the MNIST shape: FLOPs and bytes per kernel launch, the
programs per launch and the serial steps per program, and the time floor they imply on an
H200 (SXM datasheet peaks). Printed as a Markdown table for docs/triton.md; nothing here is
measured.

    python benchmarks/roofline.py [--batch 1 128 512] [--iterations 3]

FLOPs are what the kernels execute (they recompute u_hat in every pass, unlike DESIGN.md
section 6's floor, which counts it once). Bytes count each tensor a launch reads or writes
once (a cold cache; W re-read by later sample blocks is assumed to hit L2, which holds it).
The chunk counts and phase B's plan are the launcher's own (configs.capsule_chunks,
configs.final_plan), for an H200's 132 multiprocessors. Serial steps: capsules per pass
program, tiles of configs.reduce_chunk_tile chunks per reduction program, sample blocks per final
program.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastcaps.cases import RoutingShape
from fastcaps.kernels.triton.configs import REDUCE_CONFIG, capsule_chunks, final_plan, pass_config, reduce_chunk_tile

# NVIDIA H200 SXM datasheet: fp32 (non-tensor) FLOP/s and HBM3e bytes/s; 132 SMs.
H200_FP32_FLOPS = 67e12
H200_HBM_BYTES = 4.8e12
H200_SMS = 132
I, J, D, DIN = 1152, 10, 16, 8
FLOAT = 4


def launches(batch: int, iterations: int):
    """chunks, and (kernel, count, FLOPs per launch, bytes per launch, programs per launch,
    serial steps per program) for one forward+backward, fp32."""
    prediction = 2 * I * J * D * DIN  # u_hat for one sample
    capsule_sum = 2 * I * J * D  # one u_hat . x or c * u_hat over all capsules
    shape = RoutingShape(batch, I, DIN, J, D)
    block = pass_config(batch, torch.float32, shape).block_b
    per_chunk, chunks = capsule_chunks(batch, I, block, H200_SMS)
    plan = final_plan(shape, torch.float32, H200_SMS)
    pass_programs = -(-batch // block) * chunks
    reduce_programs = -(-batch // REDUCE_CONFIG.block_b)
    reduce_steps = -(-chunks // reduce_chunk_tile(shape, torch.float32))
    final_steps = -(-min(batch, plan.samples_per_split) // plan.config.block_b)
    weight, inputs = J * I * D * DIN * FLOAT, batch * I * DIN * FLOAT
    state = batch * J * D * FLOAT
    partials = batch * chunks * J * D * FLOAT
    forward_pass = batch * (prediction + 2 * capsule_sum)  # logits, weighted sum
    backward_pass = batch * (prediction + 3 * capsule_sum)  # logits, gamma, delta-weighted sum
    final = batch * (3 * prediction + iterations * 4 * capsule_sum)  # u_hat, grad u, grad W
    return chunks, [
        ("forward pass", iterations, forward_pass, weight + inputs + state + partials, pass_programs, per_chunk),
        ("forward reduce", iterations, batch * chunks * J * D, partials + 4 * state, reduce_programs, reduce_steps),
        ("backward prologue + reduce", iterations, batch * chunks * J * D, partials + 2 * iterations * state,
         reduce_programs, reduce_steps),
        ("backward pass (phase A)", iterations - 1, backward_pass, weight + inputs + 2 * state + partials,
         pass_programs, per_chunk),
        ("final (phase B)", 1, final, 2 * weight + 2 * inputs + 2 * iterations * state, I * plan.splits, final_steps),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 128, 512])
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args(argv)
    print("| B | chunks | kernel | launches | programs | serial steps | GFLOP each | MB each | compute floor | "
          "memory floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        chunks, rows = launches(batch, args.iterations)
        floors = {"forward": [0.0, 0], "forward+backward": [0.0, 0]}
        for name, launched, flop, byte, programs, steps in rows:
            compute, memory = flop / H200_FP32_FLOPS, byte / H200_HBM_BYTES
            for mode in floors:
                if mode == "forward+backward" or name.startswith("forward"):
                    floors[mode][0] += launched * max(compute, memory)
                    floors[mode][1] += launched
            print(f"| {batch} | {chunks} | {name} | {launched} | {programs} | {steps} | {flop / 1e9:.3f} | "
                  f"{byte / 1e6:.2f} | "
                  f"{compute * 1e6:.1f} us | {memory * 1e6:.1f} us |")
        for mode, (seconds, count) in floors.items():
            print(f"| {batch} | | **{mode} floor** | {count} | | | | | **{seconds * 1e6:.0f} us** + {count} launch "
                  "latencies | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
