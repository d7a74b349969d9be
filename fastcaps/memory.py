"""Peak memory of routing on CPU: a fresh process per measurement, its peak RSS growth.

Method (Linux): a worker process builds the inputs, runs the workload once (warm-up:
lazy initialisation, thread pools, allocator), resets the kernel's peak-RSS counter
(writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS), runs the workload
again and reports VmHWM - VmRSS before that run: the steady-state peak growth. glibc's
mmap threshold is pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor-sized
buffer is mapped and unmapped on its own and freed memory leaves RSS instead of being
kept in the heap, where a second run would reuse it unseen. The figure counts every
byte the workload touches: torch's tensors, autograd's saved tensors, gradients, and
library workspaces.

    python -m fastcaps.memory --batch 128          # MNIST DigitCaps, every backend
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Workload:
    backend: str
    mode: str
    batch: int = 128
    in_caps: int = 1152
    in_dim: int = 8
    out_caps: int = 10
    out_dim: int = 16
    iterations: int = 3
    dtype: str = "float32"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _worker(workload: Workload) -> dict:
    import torch

    from .functional import dynamic_routing

    dtype = getattr(torch, workload.dtype)
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(workload.batch, workload.in_caps, workload.in_dim, generator=generator).to(dtype)
    weight = torch.randn(workload.out_caps, workload.in_caps, workload.out_dim, workload.in_dim,
                         generator=generator).to(dtype) * 0.05
    backward = workload.mode == "forward+backward"
    u.requires_grad_(backward)
    weight.requires_grad_(backward)

    def run():
        with torch.set_grad_enabled(backward):
            v = dynamic_routing(u, weight, None, workload.iterations, False, workload.backend)
            if backward:
                grads = torch.autograd.grad(v, (u, weight), torch.ones_like(v))
                del grads
            del v

    run()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    run()
    return {"peak_growth_bytes": (_status_kib("VmHWM") - before) * 1024}


def peak_growth(workload: Workload, timeout: float = 600) -> int:
    """Steady-state peak RSS growth of ``workload`` in bytes, measured in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-m", "fastcaps.memory", "--worker", json.dumps(asdict(workload))],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {workload} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcaps.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backend", action="append", help="repeatable; default: every CPU backend")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable; default: both")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(Workload(**json.loads(args.worker)))))
        return 0

    from .backends import available_backends
    from .check import format_table

    backends = args.backend or available_backends("cpu")
    rows, baseline = [], {}
    for mode in args.mode or MODES:
        for backend in backends:
            growth = peak_growth(Workload(backend, mode, batch=args.batch))
            baseline.setdefault(mode, growth)
            rows.append([mode, backend, f"{growth / 2**20:.1f}", f"{growth / baseline[mode]:.3f}"])
    print(f"MNIST DigitCaps (1152x8 -> 10x16, r=3, float32), batch {args.batch}, CPU; "
          "steady-state peak RSS growth, fresh process per row")
    print(format_table(rows, ("mode", "backend", "peak MiB", f"vs {backends[0]}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
