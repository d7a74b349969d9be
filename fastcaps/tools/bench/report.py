"""The results of ``fastcaps bench``: speed-ups taken round by round, the printed table, the
JSON file with what the results are a fact about, and the comparison of two runs.

A speed-up is the median over rounds of the reference's time divided by the provider's in
the same round; its spread is the first to third quartile of those ratios. Two runs agree
when their spreads overlap (``fastcaps bench --compare A B``).
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
from typing import List, Optional, Sequence, Tuple

import torch

from ... import __version__
from ..tables import format_table
from . import engine as bench
from .workloads import workload

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
            "case": p.case, "shape": workload(p.shape).describe(p.shape), "batch": p.batch, "iterations": p.iterations,
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
    return format_table(lines, TABLE_HEADER)


# The flags that say which vector instructions a CPU has (x86-64: /proc/cpuinfo "flags";
# aarch64: "Features").
_VECTOR_FLAGS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "asimd", "sve")


def cpu_description() -> dict:
    """The CPU as /proc/cpuinfo names it: model name, family and model numbers, vector flags,
    and which build of the C++ kernels runs on it (``None`` without the extension)."""
    from ...kernels.cpu import extension

    fields = extension.cpu_fields()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": fields.get("model name") or platform.processor(), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"), "cpu_vector_flags": [flag for flag in _VECTOR_FLAGS if flag in flags],
            "cpu_kernels_build": extension.isa()}


def machine() -> dict:
    """What a result is a fact about."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["fastcaps", *sys.argv[1:]]),
        "platform": platform.platform(), **cpu_description(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__,
        "fastcaps": __version__,
        "git_commit": git_commit(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def git_commit() -> Optional[str]:
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
    print(format_table(lines, ("case mode B r provider", os.path.basename(path_a), os.path.basename(path_b), "")))
    print(f"\n{len(lines) - disagreements} of {len(lines)} speed-ups agree within their spreads")
    return 1 if disagreements or not lines else 0
