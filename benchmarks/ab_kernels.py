"""Two versions of the C++ routing kernels timed in one process, round by round.

    python benchmarks/ab_kernels.py OTHER_CHECKOUT [--batch 128] [--rounds 40] [--mode forward+backward]
    python benchmarks/ab_kernels.py OTHER_CHECKOUT --case votes [--batch 8]

On a noisy machine (a shared VM whose speed drifts by 30% within a minute) two processes
timed one after the other cannot tell a 10% change from the drift. This builds the other
checkout's csrc/ under the op namespace fastcaps_other (a copy with the namespace renamed,
compiled with setup.py's flags by torch.utils.cpp_extension.load into a cache folder), loads
it beside this checkout's extension, and alternates the two on the same inputs: the ratio
is taken per round (other / this), as `fastcaps bench` does, and the median and quartiles
are printed with each side's median time. MNIST DigitCaps shape, float32, r = 3. glibc keeps
freed memory (the bench's steady-state allocator), so that a kernel's buffers cost no page
faults per call, as in the bench and in a long-running training process.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import shutil
import statistics
import tempfile

import torch
from torch.utils import cpp_extension

import fastcaps  # noqa: F401  (registers this checkout's kernels)
from fastcaps.kernels.cpu import dynamic_routing as this_kernels
from fastcaps.tools.bench import engine as bench
from fastcaps.tools.bench import report

NAMESPACE = "fastcaps_other"


def build_other(checkout: pathlib.Path) -> None:
    """Compile checkout/csrc with its op namespace renamed, and define the schemas there."""
    sources = sorted((checkout / "csrc").rglob("*"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()[:12]
    folder = pathlib.Path(tempfile.gettempdir()) / f"fastcaps_other_{digest}"
    if not folder.exists():
        shutil.copytree(checkout / "csrc", folder / "csrc")
        for path in (folder / "csrc").rglob("*.cpp"):
            text = re.sub(r"TORCH_LIBRARY_(FRAGMENT|IMPL)\(fastcaps,", rf"TORCH_LIBRARY_\1({NAMESPACE},", path.read_text())
            path.write_text(text.replace("PyInit__C", "PyInit_fastcaps_other"))
    cpp_files = [str(p) for p in sorted((folder / "csrc").rglob("*.cpp"))]
    cpp_extension.load(
        "fastcaps_other", cpp_files, extra_cflags=["-O3", "-DNDEBUG", "-ffp-contract=fast", "-fopenmp"],
        extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False,
    )
    library = torch.library.Library(NAMESPACE, "FRAGMENT")
    for schema in this_kernels.SCHEMAS:
        library.define(schema)
    build_other.library = library  # kept alive: dropping it removes the schemas


def step(ops, u, weight, bias, mode: str) -> None:
    kept = u.new_empty(this_kernels.kept_numel(u.shape[0], weight.shape[1], weight.shape[0], weight.shape[2], u.dtype))
    v, s = ops.routing_cpu_forward(u, weight, bias, 3, False, kept)
    if mode == "forward+backward":
        ops.routing_cpu_backward(torch.ones_like(v), u, weight, s, kept, 3, False, False)


def votes_step(ops, votes, grad_v, bias, mode: str) -> None:
    v, s = ops.votes_cpu_forward(votes, bias, 3, False)
    if mode == "forward+backward":
        ops.votes_cpu_backward(grad_v, votes, s, 3, False, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=pathlib.Path, help="a checkout of fastcaps whose csrc/ is compared")
    parser.add_argument("--case", choices=("mnist", "votes"), default="mnist")
    parser.add_argument("--batch", type=int, help="default: 128 (mnist), 8 (votes)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--mode", choices=("forward", "forward+backward"), default="forward+backward")
    args = parser.parse_args()
    build_other(args.other.resolve())
    bench.steady_state_allocator()  # as the bench times: freed memory reused, no page faults per call
    generator = torch.Generator().manual_seed(0)
    sides = {"this": torch.ops.fastcaps, "other": getattr(torch.ops, NAMESPACE)}
    if args.case == "mnist":
        args.batch = args.batch or 128
        u = torch.randn(args.batch, 1152, 8, generator=generator)
        weight = torch.randn(10, 1152, 16, 8, generator=generator) * 0.05
        bias = u.new_empty(0)
        calls = {name: (lambda ops=ops: step(ops, u, weight, bias, args.mode)) for name, ops in sides.items()}
    else:
        args.batch = args.batch or 8
        votes = torch.randn(args.batch * 49, 288, 32, 16, generator=generator) / 4
        grad_v = torch.randn(args.batch * 49, 32, 16, generator=generator)
        bias = votes.new_empty(0)
        calls = {name: (lambda ops=ops: votes_step(ops, votes, grad_v, bias, args.mode)) for name, ops in sides.items()}
    for call in calls.values():  # warm-up, not kept
        call()
    seconds = dict(zip(calls, bench.interleaved_rounds(list(calls.values()), args.rounds)))
    median, q1, q3 = report.round_ratios(seconds["other"], seconds["this"])
    print(f"{args.case} {args.mode} B={args.batch}, {torch.get_num_threads()} threads: this "
          f"{statistics.median(seconds['this']) * 1e3:.2f} ms, other {statistics.median(seconds['other']) * 1e3:.2f} ms;"
          f" other / this median {median:.3f}x [{q1:.3f}, {q3:.3f}] over {args.rounds} rounds")


if __name__ == "__main__":
    main()
