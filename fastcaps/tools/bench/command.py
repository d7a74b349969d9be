"""``fastcaps bench``: check, then time and measure every provider; table, JSON and chart.

Two methods, the same rounds. Both check the kernels first (nothing wrong is timed), time
the providers of each group in interleaved rounds, take speed-ups round by round, and
measure peak memory in fresh processes.

- The quick default (a few minutes on 2 cores): MNIST DigitCaps, B = 1 and 128, r = 3,
  both modes; every group timed in one worker process (torch is imported and the reference
  compiled once), at least 9 rounds or 2 s per group; peak memory of forward+backward.
- ``--full``: B = 1, 32 and 128; each group in 3 fresh processes whose rounds are pooled, so
  that what varies from process to process lands inside the spread; at least 9 rounds or
  4 s per group; peak memory of every point. This is the method of the figures in docs/.

Any option given explicitly overrides the method's value.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

from ...backends import BACKENDS
from ...cases import RoutingShape
from .. import check
from . import charts
from . import engine as bench
from . import report

# The two methods: option -> value, where the user gave none.
QUICK = dict(case=["mnist"], batch=[1, 128], iterations=[3], mode=list(bench.MODES), repeats=9, min_seconds=2.0,
             warmup=2, processes=1, one_process=True, memory_modes=["forward+backward"])
FULL = dict(case=["mnist"], batch=[1, 32, 128], iterations=[3], mode=list(bench.MODES), repeats=9, min_seconds=4.0,
            warmup=2, processes=3, one_process=False, memory_modes=list(bench.MODES))


def scaling_points(provider_names: Sequence[str], mode: str, device: str) -> List[Tuple[str, str, bench.Point]]:
    """(sweep, fixed, point): one variable at a time around MNIST, B = 32, r = 3."""
    mnist = bench.CASES["mnist"]
    sweeps = []
    for batch in (1, 8, 32, 128, 512):
        sweeps.append(("batch", "MNIST shape, r=3", "mnist", mnist.with_batch(batch), 3))
    for in_caps in (288, 1152, 4608):
        sweeps.append(("in_caps", "B=32, J=10, r=3", f"I{in_caps}", RoutingShape(32, in_caps, 8, 10, 16), 3))
    for out_caps in (5, 10, 20, 40):
        sweeps.append(("out_caps", "B=32, I=1152, r=3", f"J{out_caps}", RoutingShape(32, 1152, 8, out_caps, 16), 3))
    for iterations in (1, 2, 3, 5):
        sweeps.append(("iterations", "MNIST shape, B=32", "mnist", mnist.with_batch(32), iterations))
    return [
        (sweep, fixed, bench.Point(case, shape, r, mode, provider, "float32", device))
        for sweep, fixed, case, shape, r in sweeps for provider in provider_names
    ]


def run_check(device: str, backends: List[str]) -> bool:
    """``fastcaps check``'s default cases in float32 on ``device``, for the kernels to be timed."""
    rows_ = check.run(backends, check.default_cases(), [torch.float32], device=device)
    failed = [r for r in rows_ if not r.passed]
    for row in failed:
        print("FAILED: " + "  ".join(check.format_row(row)))
    print(f"correctness check: {len(rows_) - len(failed)} passed, {len(failed)} failed "
          f"({', '.join(backends)} vs the float64 reference, float32)", flush=True)
    return not failed


def _method_line(args) -> str:
    if args.one_process:
        how = "every group in one worker process (process-to-process variation is not in the spread)"
    else:
        how = f"each group in {args.processes} fresh processes, rounds pooled"
    memory = ", ".join(args.memory_modes) if args.memory_modes else "none"
    return (f"method: {'full' if args.full else 'quick (fastcaps bench --full for the full method and grid)'}; "
            f"interleaved rounds, at least {args.repeats} per group or {args.min_seconds:g} s; {how}; "
            f"peak memory: {memory}")


def bench_command(args) -> int:
    from tqdm import tqdm

    if args.compare:
        return report.compare(*args.compare)
    started = time.perf_counter()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"fastcaps bench: --device {device} asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.provider or bench.providers(device)
    print(_method_line(args), flush=True)
    if not run_check(device, [name for name in names if name in BACKENDS and name != "reference"]):
        print("fastcaps bench: a backend failed its correctness check; nothing was timed", file=sys.stderr)
        return 1
    # The timing workers set it for themselves; this records whether it takes here.
    steady = bench.steady_state_allocator() if device == "cpu" else None
    if "reference" not in names:
        names = ["reference", *names]  # the denominator of every ratio
    meta = report.machine()
    meta["allocator"] = {True: "glibc steady state (mmap off, no trim)", False: "system default (not glibc)",
                         None: "CUDA caching allocator"}[steady]
    meta["method"] = _method_line(args)
    if args.scaling:
        planned = scaling_points(names, "forward+backward", device)
        points = [p for _, _, p in planned]
    else:
        points = bench.points(args.case, args.batch if args.batch_given else None, args.iterations, args.mode,
                              names, args.dtype, device, default_batches=args.batch)
    groups: Dict[tuple, List[bench.Point]] = {}
    for point in points:
        groups.setdefault(bench.group_key(point), []).append(point)
    with tqdm(total=len(groups), desc="fastcaps bench: timing", unit="group", file=sys.stderr) as bar:
        measured = bench.measure_in_processes(list(groups.values()), args.processes, args.repeats, args.warmup,
                                              args.min_seconds, args.one_process, on_measured=bar.update)
    by_point = {result.point: result for group in measured for result in group}
    weighed = [point for point in points if point.mode in args.memory_modes]
    for point in tqdm(weighed, desc="fastcaps bench: peak memory", unit="point", file=sys.stderr):
        by_point[point].peak_bytes = bench.peak_memory(point)
    records = report.rows([by_point[point] for point in points])
    if args.scaling:
        for record, (sweep, fixed, point) in zip(records, planned):
            record.update(sweep=sweep, fixed=fixed,
                          x={"batch": point.batch, "in_caps": point.shape.in_caps,
                             "out_caps": point.shape.out_caps, "iterations": point.iterations}[sweep])
    print(report.table(records))
    print(f"\nCPU: {meta['cpu']} (family {meta['cpu_family']}, model {meta['cpu_model']}), vector flags "
          f"{' '.join(meta['cpu_vector_flags']) or 'none found'}; C++ kernels: the "
          f"{meta['cpu_kernels_build'] or 'missing'} build")
    meta["matmul_gflops"] = round(bench.matmul_rate(device, args.dtype), 1)
    print(f"\nthis machine's {args.dtype} matrix multiply (torch.mm 2048 x 2048, {torch.get_num_threads()} threads): "
          f"{meta['matmul_gflops']} GFLOP/s; GFLOP/s above count DESIGN.md section 6's arithmetic")
    processor = meta["cpu"] if device == "cpu" else meta.get("gpu", device)
    title = f"fastcaps bench, {processor}, torch {meta['torch']}, {meta['date'][:10]}"
    meta["seconds"] = round(time.perf_counter() - started, 1)
    report.write_json(args.json, records, meta)
    (charts.scaling_chart if args.scaling else charts.chart)(args.chart, records, title)
    print(f"\nwrote {args.json} and {args.chart} in {meta['seconds']:.0f} s")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="check, then time and measure every provider: table, JSON and chart",
        description=__doc__ + "\n" + report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the full method and grid (see above)")
    parser.add_argument("--case", action="append", choices=list(bench.CASES),
                        help="repeatable; default: mnist. conv: ConvCaps2d, 32 x 8D on 14 x 14, K = 3, padding 1, "
                             "32 x 16D; votes: route_votes of 49 x 288 votes for 32 x 16D; em, em-stride1, "
                             "em-class: the EM paper's ConvCaps1 (32 x 4x4 on 14 x 14, K = 3, stride 2), ConvCaps2 "
                             "(on 6 x 6, stride 1), class capsules (32 x 4x4 on 4 x 4 to 5, coordinate addition) "
                             "(all opt-in)")
    parser.add_argument("--batch", action="append", type=int,
                        help="repeatable; default: 1, 128 (--full: 1, 32, 128); conv and votes: 1, 8; "
                             "em cases: 1, 8, 32")
    parser.add_argument("--iterations", action="append", type=int, help="repeatable; default: 3")
    parser.add_argument("--mode", action="append", choices=bench.MODES, help="repeatable; default: both")
    parser.add_argument("--provider", action="append",
                        help="repeatable; default: reference, reference-compiled and the kernels 'auto' may "
                             f"pick on the device (one of {', '.join(BACKENDS)} or reference-compiled)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, help="timed rounds per group, at least (default 9)")
    parser.add_argument("--min-seconds", type=float,
                        help="keep adding rounds (up to 10x --repeats) until a group's rounds took this long "
                             "(default 2; --full: 4)")
    parser.add_argument("--warmup", type=int, help="untimed rounds after the first call (default 2)")
    parser.add_argument("--processes", type=int,
                        help="fresh processes per group, their rounds pooled (--full: 3; the quick default "
                             "times every group in one process)")
    parser.add_argument("--memory", dest="memory_modes", action="append", choices=bench.MODES,
                        help="modes whose peak memory is measured (repeatable; default: forward+backward, or "
                             "the modes timed if it is not one of them; --full: every mode timed)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (saves a process per point)")
    parser.add_argument("--scaling", action="store_true",
                        help="sweep B, I, J and r one at a time around MNIST (forward+backward)")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--chart", default="bench.png", help="where to write the chart")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="compare two result files instead of running")
    parser.set_defaults(run=_with_defaults)


def apply_method(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option the user did not give from the method (QUICK, or FULL with --full)."""
    method = FULL if args.full else QUICK
    # Without --batch, the opt-in cases take their own batches (engine.CASE_BATCHES).
    args.batch_given = getattr(args, "batch", None) is not None
    # Asking for processes per group asks for each group's own processes.
    args.one_process = method["one_process"] and args.processes is None
    for name, value in method.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    # The quick method weighs forward+backward; asked for other modes only, it weighs those.
    args.memory_modes = [mode for mode in args.memory_modes if mode in args.mode] or list(args.mode)
    if args.no_memory:
        args.memory_modes = []
    return args


def _with_defaults(args) -> int:
    return bench_command(apply_method(args))
