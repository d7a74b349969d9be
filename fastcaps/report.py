"""``fastcaps bench``: check, then time and measure every provider; table, JSON and charts.

The providers of a group (same case, batch, depth, mode) are timed in interleaved rounds
(``bench.measure_group``), in three fresh processes whose rounds are pooled. A speed-up
is the median over rounds of the reference's time divided by the provider's in the same
round; its spread is the first to third quartile of those ratios. Two runs agree when
their spreads overlap (``fastcaps bench --compare A B``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__, bench, check
from .backends import BACKENDS

_MIB = 2**20


def round_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Tuple[float, float, float]:
    """(median, first quartile, third quartile) of numerators[k] / denominators[k]: times of
    two providers taken in the same rounds (bench.measure_group), so that a slow stretch of
    the machine slows both sides of each ratio."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    low, high = bench.Timing(ratios).quartiles()
    return statistics.median(ratios), low, high


def _speedup(result: bench.Result, baseline: bench.Result) -> Tuple[float, float, float]:
    """round_ratios of baseline / result."""
    if len(result.seconds) != len(baseline.seconds):
        raise ValueError(f"{result.point.label}: speed-ups need samples from the same rounds "
                         "(bench.measure_group)")
    return round_ratios(baseline.seconds, result.seconds)


def rows(results: Sequence[bench.Result]) -> List[dict]:
    """One dict per result: the JSON record and the table's source."""
    baselines = {bench.group_key(r.point): r for r in results if r.point.provider == "reference"}
    records = []
    for result in results:
        p = result.point
        q1, q3 = result.timing.quartiles()
        baseline = baselines.get(bench.group_key(p))
        speedup = _speedup(result, baseline) if baseline else None
        memory_ratio = (result.peak_bytes / baseline.peak_bytes
                        if baseline and result.peak_bytes is not None and baseline.peak_bytes else None)
        records.append({
            "case": p.case, "shape": str(p.shape), "batch": p.batch, "iterations": p.iterations,
            "mode": p.mode, "provider": p.provider, "dtype": p.dtype, "device": p.device,
            "median_ms": 1e3 * result.timing.median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
            "samples_ms": [1e3 * s for s in result.seconds],
            "first_call_s": result.first_call_seconds,
            "speedup": None if speedup is None else speedup[0],
            "speedup_low": None if speedup is None else speedup[1],
            "speedup_high": None if speedup is None else speedup[2],
            "peak_mib": None if result.peak_bytes is None else result.peak_bytes / _MIB,
            "memory_vs_reference": memory_ratio,
            "gflops": result.gflops,
        })
    return records


TABLE_HEADER = ("case", "mode", "B", "r", "provider", "median ms", "IQR ms", "speed-up [spread]",
                "peak MiB", "mem vs ref", "GFLOP/s", "1st call s")


def table(records: Sequence[dict]) -> str:
    lines = []
    for r in records:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}]"
        lines.append([
            r["case"], r["mode"], str(r["batch"]), str(r["iterations"]), r["provider"],
            f"{r['median_ms']:.2f}", f"{r['q3_ms'] - r['q1_ms']:.2f}", speedup,
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}",
            "-" if r["memory_vs_reference"] is None else f"{r['memory_vs_reference']:.3f}",
            f"{r['gflops']:.2f}", f"{r['first_call_s']:.2f}",
        ])
    return check.format_table(lines, TABLE_HEADER)


def machine() -> dict:
    """What a result is a fact about."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["fastcaps", *sys.argv[1:]]),
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__,
        "fastcaps": __version__,
        "git_commit": _git_commit(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def _git_commit() -> Optional[str]:
    """The source checkout's commit, when fastcaps runs from one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def write_json(path: str, records: Sequence[dict], meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        json.dump({"meta": meta, "results": list(records)}, out, indent=1)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"reference": "#7f7f7f", "reference-compiled": "#1f77b4", "torch": "#ff7f0e", "cpu": "#2ca02c",
           "triton": "#d62728"}


def _log_axis_with_ticks(axis, xs) -> None:
    """Log-2 x axis labelled with the measured values themselves; plain y tick labels."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_locator(FixedLocator(xs))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    if axis.get_yscale() == "log":
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, which="major", alpha=0.3)


def chart(path: str, records: Sequence[dict], title: str) -> None:
    """Speed-up over the reference (top) and peak memory (bottom) against batch size, one
    column per (case, mode, iterations)."""
    plt = _pyplot()
    panels = sorted({(r["case"], r["mode"], r["iterations"]) for r in records},
                    key=lambda k: (k[0], bench.MODES.index(k[1]), k[2]))
    figure, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 7.5), squeeze=False)
    for column, (case, mode, iterations) in enumerate(panels):
        chosen = [r for r in records if (r["case"], r["mode"], r["iterations"]) == (case, mode, iterations)]
        speed_axis, memory_axis = axes[0][column], axes[1][column]
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            series = sorted((r for r in chosen if r["provider"] == provider), key=lambda r: r["batch"])
            batches = [r["batch"] for r in series]
            color = _COLORS.get(provider)
            if series[0]["speedup"] is not None:
                speedups = [r["speedup"] for r in series]
                errors = [[s - r["speedup_low"] for s, r in zip(speedups, series)],
                          [r["speedup_high"] - s for s, r in zip(speedups, series)]]
                speed_axis.errorbar(batches, speedups, yerr=errors, marker="o", capsize=3, label=provider, color=color)
            if series[0]["peak_mib"] is not None:
                memory_axis.plot(batches, [r["peak_mib"] for r in series], marker="o", label=provider, color=color)
        speed_axis.set_title(f"{case} ({chosen[0]['shape']}), {mode}, r={iterations}", fontsize=10)
        speed_axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        speed_axis.set_ylabel("speed-up over the reference (x)")
        memory_axis.set_ylabel("peak memory growth (MiB)")
        memory_axis.set_yscale("log")
        batches = sorted({r["batch"] for r in chosen})
        for axis in (speed_axis, memory_axis):
            _log_axis_with_ticks(axis, batches)
            axis.set_xlabel("batch size")
        speed_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scaling_chart(path: str, records: Sequence[dict], title: str) -> None:
    """Time (top) and peak memory (bottom) against B, I, J and r, one line per provider."""
    plt = _pyplot()
    sweeps = [s for s in ("batch", "in_caps", "out_caps", "iterations") if any(r["sweep"] == s for r in records)]
    figure, axes = plt.subplots(2, len(sweeps), figsize=(4.6 * len(sweeps), 7.5), squeeze=False)
    for column, sweep in enumerate(sweeps):
        chosen = [r for r in records if r["sweep"] == sweep]
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            series = sorted((r for r in chosen if r["provider"] == provider), key=lambda r: r["x"])
            xs = [r["x"] for r in series]
            color = _COLORS.get(provider)
            axes[0][column].errorbar(xs, [r["median_ms"] for r in series],
                                     yerr=[[r["median_ms"] - r["q1_ms"] for r in series],
                                           [r["q3_ms"] - r["median_ms"] for r in series]],
                                     marker="o", capsize=3, label=provider, color=color)
            axes[1][column].plot(xs, [r["peak_mib"] for r in series], marker="o", label=provider, color=color)
        axes[0][column].set_title(f"varying {sweep} ({chosen[0]['fixed']})", fontsize=10)
        axes[0][column].set_ylabel("median time (ms)")
        axes[1][column].set_ylabel("peak memory growth (MiB)")
        xs = sorted({r["x"] for r in chosen})
        for axis in (axes[0][column], axes[1][column]):
            axis.set_yscale("log")
            _log_axis_with_ticks(axis, xs)
            axis.set_xlabel(sweep)
        axes[0][column].legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scaling_points(provider_names: Sequence[str], mode: str, device: str) -> List[Tuple[str, str, bench.Point]]:
    """(sweep, fixed, point): one variable at a time around MNIST, B = 32, r = 3."""
    mnist = bench.CASES["mnist"]
    base = {"batch": 32, "iterations": 3}
    sweeps = []
    for batch in (1, 8, 32, 128, 512):
        sweeps.append(("batch", "MNIST shape, r=3", "mnist", mnist, batch, 3))
    for in_caps in (288, 1152, 4608):
        sweeps.append(("in_caps", "B=32, J=10, r=3", f"I{in_caps}", bench.Shape(in_caps, 8, 10, 16), base["batch"], 3))
    for out_caps in (5, 10, 20, 40):
        sweeps.append(("out_caps", "B=32, I=1152, r=3", f"J{out_caps}", bench.Shape(1152, 8, out_caps, 16), base["batch"], 3))
    for iterations in (1, 2, 3, 5):
        sweeps.append(("iterations", "MNIST shape, B=32", "mnist", mnist, base["batch"], iterations))
    return [
        (sweep, fixed, bench.Point(case, shape, batch, r, mode, provider, "float32", device))
        for sweep, fixed, case, shape, batch, r in sweeps for provider in provider_names
    ]


def compare(path_a: str, path_b: str) -> int:
    """Do two runs agree on every speed-up within their reported spreads?"""
    def load(path):
        with open(path) as source:
            data = json.load(source)
        return {(r["case"], r["mode"], r["batch"], r["iterations"], r["provider"], r["dtype"]): r
                for r in data["results"] if r["speedup"] is not None and r["provider"] != "reference"}

    a, b = load(path_a), load(path_b)
    lines, disagreements = [], 0
    for key in sorted(set(a) & set(b), key=str):
        ra, rb = a[key], b[key]
        overlap = ra["speedup_low"] <= rb["speedup_high"] and rb["speedup_low"] <= ra["speedup_high"]
        disagreements += not overlap
        lines.append([" ".join(str(k) for k in key[:5]),
                      f"{ra['speedup']:.2f}x [{ra['speedup_low']:.2f}, {ra['speedup_high']:.2f}]",
                      f"{rb['speedup']:.2f}x [{rb['speedup_low']:.2f}, {rb['speedup_high']:.2f}]",
                      "agree" if overlap else "DISAGREE"])
    print(check.format_table(lines, ("case mode B r provider", os.path.basename(path_a), os.path.basename(path_b), "")))
    print(f"\n{len(lines) - disagreements} of {len(lines)} speed-ups agree within their spreads")
    return 1 if disagreements or not lines else 0


def run_check(device: str, backends: List[str]) -> bool:
    """``fastcaps check``'s default cases in float32 on ``device``, for the kernels to be timed."""
    rows_ = check.run(backends, check.default_cases(), [torch.float32], device=device)
    failed = [r for r in rows_ if not r.passed]
    for row in failed:
        print("FAILED: " + "  ".join(check.format_row(row)))
    print(f"correctness check: {len(rows_) - len(failed)} passed, {len(failed)} failed "
          f"({', '.join(backends)} vs the float64 reference, float32)")
    return not failed


def bench_command(args) -> int:
    from tqdm import tqdm

    if args.compare:
        return compare(*args.compare)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"fastcaps bench: --device {device} asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.provider or bench.providers(device)
    if not run_check(device, [name for name in names if name in BACKENDS and name != "reference"]):
        print("fastcaps bench: a backend failed its correctness check; nothing was timed", file=sys.stderr)
        return 1
    # The timing workers set it for themselves; this records whether it takes here.
    steady = bench.steady_state_allocator() if device == "cpu" else None
    if "reference" not in names:
        names = ["reference", *names]  # the denominator of every ratio
    meta = machine()
    meta["allocator"] = {True: "glibc steady state (mmap off, no trim)", False: "system default (not glibc)",
                         None: "CUDA caching allocator"}[steady]
    if args.scaling:
        planned = scaling_points(names, "forward+backward", device)
        points = [p for _, _, p in planned]
    else:
        points = bench.points(args.case, args.batch, args.iterations, args.mode, names, args.dtype, device)
    groups: Dict[tuple, List[bench.Point]] = {}
    for point in points:
        groups.setdefault(bench.group_key(point), []).append(point)
    results = []
    for group in tqdm(list(groups.values()), desc="fastcaps bench", unit="group", file=sys.stderr):
        results.extend(bench.measure_group_in_processes(group, args.processes, args.repeats, args.warmup,
                                                        args.min_seconds, memory=not args.no_memory))
    by_point = {result.point: result for result in results}
    records = rows([by_point[point] for point in points])
    if args.scaling:
        for record, (sweep, fixed, point) in zip(records, planned):
            record.update(sweep=sweep, fixed=fixed,
                          x={"batch": point.batch, "in_caps": point.shape.in_caps,
                             "out_caps": point.shape.out_caps, "iterations": point.iterations}[sweep])
    print(table(records))
    meta["matmul_gflops"] = round(bench.matmul_rate(device, args.dtype), 1)
    print(f"\nthis machine's {args.dtype} matrix multiply (torch.mm 2048 x 2048, {torch.get_num_threads()} threads): "
          f"{meta['matmul_gflops']} GFLOP/s; GFLOP/s above count DESIGN.md section 6's arithmetic")
    title = f"fastcaps bench, {meta['cpu'] if device == 'cpu' else meta.get('gpu', device)}, torch {meta['torch']}, {meta['date'][:10]}"
    write_json(args.json, records, meta)
    (scaling_chart if args.scaling else chart)(args.chart, records, title)
    print(f"\nwrote {args.json} and {args.chart}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="check, then time and measure every provider: table, JSON and chart",
        description=__doc__ + "\nThe default run (MNIST DigitCaps, B in 1, 32, 128, r = 3, both modes) takes "
        "4 to 5 minutes on 2 CPU cores.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", action="append", choices=list(bench.CASES), help="repeatable; default: mnist")
    parser.add_argument("--batch", action="append", type=int, help="repeatable; default: 1, 32, 128")
    parser.add_argument("--iterations", action="append", type=int, help="repeatable; default: 3")
    parser.add_argument("--mode", action="append", choices=bench.MODES, help="repeatable; default: both")
    parser.add_argument("--provider", action="append",
                        help="repeatable; default: reference, reference-compiled and the kernels 'auto' may "
                             "pick on the device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per group, at least")
    parser.add_argument("--min-seconds", type=float, default=4.0,
                        help="keep adding rounds (up to 10x --repeats) until a group's rounds took this long")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first call")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per group; their rounds are pooled (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (saves a process per point)")
    parser.add_argument("--scaling", action="store_true",
                        help="sweep B, I, J and r one at a time around MNIST (forward+backward)")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--chart", default="bench.png", help="where to write the chart")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="compare two result files instead of running")
    parser.set_defaults(run=_with_defaults)


def _with_defaults(args) -> int:
    args.case = args.case or ["mnist"]
    args.batch = args.batch or [1, 32, 128]
    args.iterations = args.iterations or [3]
    args.mode = args.mode or list(bench.MODES)
    return bench_command(args)
