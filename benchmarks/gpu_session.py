"""One GPU session's checks and measurements, in one process, for the few minutes a GPU is lent.

    PYTHONPATH=. python benchmarks/gpu_session.py [--out benchmarks/results] [--redo]
    bash benchmarks/gpu_session.sh        # the same from any folder; --out defaults to $OUT

Run from a clone: it imports this checkout's fastcaps (PYTHONPATH=.), needs torch, triton
and numpy only (no tqdm, matplotlib or pip install), and runs with or without the C++
extension. Groups, in this order; each one's results are written to OUT/gpu-session.json and
OUT/gpu-session.txt as soon as it ends, so a time-out keeps what was done, and a rerun skips
every group already there without an error (--redo runs them all again; results made with
other --device or --smoke are never mixed in):

  device       GPU name, SM count, memory, capability; torch, triton, Python, CUDA versions
  correctness  the Triton kernels against the float64 reference (fastcaps.tools.check), values
               and gradients, at the MNIST shape and two odd shapes (r = 1, 3; detach; bias),
               float32, float16 and bfloat16 (check.half_check), float64 at one odd shape;
               the same call
               twice bitwise equal; torch.compile(fullgraph=True) of the layer against eager;
               and, apart, the errors with the passes' float32 u_hat on tensor cores (tf32x3)
  graph        forward+backward under torch.cuda.set_sync_debug_mode("error") (no host
               sync), then captured in a CUDA graph, replayed, and compared with eager
  time-...     per mode and batch (MNIST DigitCaps, r = 3, float32): the reference,
               torch.compile of it and the Triton kernels in interleaved rounds
               (fastcaps.tools.bench.engine.measure_group, as `fastcaps bench` times), with the
               speed-up per round, and each provider's peak memory (the CUDA allocator's;
               on CPU the RSS growth of a call in this warm process, not a measurement)
  time-conv-.. ConvCaps2d forward+backward at B = 1 and 8 (bench case conv), the same providers
  time-votes-. route_votes forward+backward at B = 8 (bench case votes: 49 positions of
               288 x 32 x 16D votes a sample), the same providers
  profile      torch.profiler over forward+backward calls of the Triton kernels at B = 1 and
               128: a table of the time per kernel (not a trace file)

Two files in all (JSON and text), each well under the device tool's 16 MB.

Expected time on one H200 from a cold cache (estimated from the parts, not measured: no GPU
has run it yet). Correctness: about 60 Triton compilations (per shape and dtype, the pass
both ways, two reductions, the prologue and phase B with and without detach: 3 shapes x
(float32, float16, bfloat16) plus float64 once, and the tf32x3 passes), 0.5-2 s each, so
0.5-2 min; torch.compile of the layer once, about 20 s. Timing: torch.compile of the
reference at 4 batches x 2 modes, 8 compilations, assumed 10-30 s each from a cold cache
(1.5-4 min; with a warm cache its first calls took 3.0-4.7 s on this project's 2-core CPU,
benchmarks/results/cpu-mnist-zen3-avx2-run5.json, first_call_s), then rounds of at least 2 s
per group (16 s in all); the two ConvCaps2d groups add two more compilations of a reference
and about 5 s of rounds, and the route_votes group one more compilation and its rounds (with
the votes kernels: about 10 more Triton compilations, 0.3-0.8 min in all). Profile: seconds.
About 4-8 min in all; a rerun of the part that
failed fits in what the 15-minute session leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Dict, List
from unittest import mock

import torch

import fastcaps
from fastcaps.cases import ConvShape, RoutingShape, VotesShape, make_inputs
from fastcaps.tools import check
from fastcaps.tools.bench import engine as bench
from fastcaps.tools.bench import report, workloads
from fastcaps.tools.tables import format_table

JSON_NAME, TEXT_NAME = "gpu-session.json", "gpu-session.txt"
MNIST = RoutingShape(5, 1152, 8, 10, 16)
ODD_SHAPES = [RoutingShape(3, 7, 3, 3, 5), RoutingShape(17, 33, 4, 4, 12)]
# --smoke: what the test runs on CPU under the interpreter, in seconds.
SMOKE_SHAPES = [RoutingShape(2, 5, 3, 3, 4)]
SMOKE_CONV = ConvShape(1, 2, 3, 4, 4, 2, 3, (3, 3), (1, 1), (1, 1))
SMOKE_VOTES = VotesShape(1, 2, 5, 3, 4)
# ConvCaps2d (bench case conv: 32 x 8D on 14 x 14, K = 3, padding 1, 32 x 16D) and route_votes
# (bench case votes: B = 8 only, to keep the session's minutes), forward+backward.
CONV_BATCHES = (1, 8)
VOTES_BATCHES = (8,)
OPTIONS = [(3, False, True), (3, True, False), (1, False, False)]  # (iterations, detach, bias)


# --- groups: each returns a JSON-able dict and lines of text ------------------------------


def device_group(args) -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "fastcaps": fastcaps.__version__,
             "git_commit": report.git_commit(), "device": args.device,
             "backends": fastcaps.available_backends(args.device)}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        facts.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        facts.update(report.cpu_description(), interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    return facts


def _case_rows(args) -> List[dict]:
    shapes = SMOKE_SHAPES if args.smoke else [MNIST, *ODD_SHAPES]
    rows = []
    for index, (shape, options) in enumerate((s, o) for s in shapes for o in OPTIONS):
        case = check.Case(shape, *options)
        oracle = check.oracle_for(case, index)
        # float64 at one shape: its kernels are checked at every shape under the interpreter in
        # CI, and each dtype here costs compilations of its own.
        for dtype in (torch.float32, torch.float64) if shape == shapes[-1] else (torch.float32,):
            row = check.check_case("triton", case, dtype, index, oracle, device=args.device)
            rows.append({"shape": str(shape), "options": case.options, "dtype": str(dtype)[6:],
                         "passed": row.passed, "errors": check.format_row(row)[4:9]})
        for dtype in (torch.float16, torch.bfloat16):
            if args.device == "cpu" and dtype == torch.bfloat16:
                continue  # the interpreter has no bfloat16 (the launcher widens it: nothing new to see)
            result = check.half_check("triton", shape, dtype, device=args.device, iterations=options[0])
            rows.append({"shape": str(shape), "options": case.options, "dtype": str(dtype)[6:],
                         "passed": result["passed"],
                         "errors": [f"{result['error']:.1e}", f"same-dtype reference {result['error_same_dtype']:.1e}"]})
    return rows


def _layer_call(shape: RoutingShape, device: str, seed: int = 0):
    """call(route=fastcaps.dynamic_routing) -> [v, grad u, grad W, grad bias]: forward+backward
    of route on the Triton kernels, on the same inputs every call."""
    u, weight, bias, grad_v = make_inputs(shape, seed, bias=True, dtype=torch.float32, device=device)
    leaves = [t.requires_grad_() for t in (u, weight, bias)]

    def call(route: Callable = fastcaps.dynamic_routing):
        v = route(*leaves, 3, False, backend="triton")
        return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]

    return call


def correctness_group(args) -> dict:
    rows = _case_rows(args)
    shape = SMOKE_SHAPES[0] if args.smoke else MNIST.with_batch(128)
    call = _layer_call(shape, args.device)
    first, second = call(), call()
    repeatable = all(torch.equal(a, b) for a, b in zip(first, second))
    compiled = torch.compile(fastcaps.dynamic_routing, fullgraph=True, dynamic=False)
    from_compiled = call(compiled)
    compile_error = max(check.normwise_error(a, b) for a, b in zip(from_compiled, first))
    passed = all(r["passed"] for r in rows) and repeatable and compile_error <= check.TOLERANCE[torch.float32]
    return {"passed": passed, "cases": rows, "bitwise_repeatable": repeatable, "repeat_shape": str(shape),
            "compiled_vs_eager_error": compile_error, "compiled_bitwise": compile_error == 0.0,
            "tf32x3": _tf32x3_rows(args)}


def _tf32x3_rows(args) -> List[dict]:
    """The passes' float32 u_hat on tensor cores (FASTCAPS_TRITON_FLOAT32_DOT=tf32x3, off by
    default): its errors against the float64 reference, to say whether it may be turned on.
    Not part of "passed"."""
    from fastcaps.kernels.triton import configs

    shapes = [SMOKE_SHAPES[0].with_batch(17)] if args.smoke else [MNIST.with_batch(128), ODD_SHAPES[1]]
    rows = []
    with mock.patch.dict(os.environ, {configs.FLOAT32_DOT_VARIABLE: "tf32x3"}):
        for index, shape in enumerate(shapes):
            case = check.Case(shape, 3, False, True)
            row = check.check_case("triton", case, torch.float32, 100 + index, device=args.device)
            rows.append({"shape": str(shape), "options": case.options, "within_float32_tolerance": row.passed,
                         "errors": check.format_row(row)[4:8]})
    return rows


def graph_group(args) -> dict:
    if not args.device.startswith("cuda"):
        return {"skipped": "needs CUDA: sync debug mode and CUDA graphs"}
    shape = SMOKE_SHAPES[0] if args.smoke else MNIST.with_batch(128)
    call = _layer_call(shape, args.device)
    eager = call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        sync_free, sync_error = True, None
    except RuntimeError as error:
        sync_free, sync_error = False, str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
        replay_equal = all(torch.equal(a, b) for a, b in zip(captured, eager))
        capture_error = None
    except RuntimeError as error:
        replay_equal, capture_error = False, str(error).splitlines()[0]
    return {"passed": sync_free and replay_equal, "sync_free": sync_free, "sync_error": sync_error,
            "replay_equals_eager": replay_equal, "capture_error": capture_error, "shape": str(shape)}


def timing_group(args, mode: str, batch: int, case: str = "mnist") -> dict:
    if args.smoke:
        case, shape = f"smoke-{case}", {"conv": SMOKE_CONV, "votes": SMOKE_VOTES}.get(case, SMOKE_SHAPES[0])
    else:
        shape = bench.CASES[case]
    points = [bench.Point(case, shape.with_batch(batch), 3, mode, provider, "float32", args.device)
              for provider in args.provider]
    results = bench.measure_group(points, args.rounds, warmup=2, min_seconds=args.min_seconds)
    for result in results:
        result.peak_bytes = bench.peak_in_this_process(result.point)
    return {"records": report.rows(results)}


def profile_group(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    tables = {}
    for batch in args.profile_batch:
        call = _layer_call((SMOKE_SHAPES[0] if args.smoke else MNIST).with_batch(batch), args.device)
        call()  # compiled before the profile
        with profile(activities=activities) as prof:
            for _ in range(5):
                call()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        rows = []
        for event in prof.key_averages():
            device_us = getattr(event, "device_time_total", None)
            if device_us is None:
                device_us = getattr(event, "cuda_time_total", 0.0)
            rows.append({"name": event.key, "calls": event.count, "device_us_per_step": device_us / 5,
                         "cpu_us_per_step": event.cpu_time_total / 5})
        key = "device_us_per_step" if args.device.startswith("cuda") else "cpu_us_per_step"
        rows.sort(key=lambda r: -r[key])
        tables[f"B{batch}"] = rows[:25]
    return {"per_step_of": "forward+backward, 5 steps profiled, times per step", "tables": tables}


# --- files -------------------------------------------------------------------------------


def _text(groups: Dict[str, dict]) -> str:
    lines = []
    for name, result in groups.items():
        lines.append(f"== {name}")
        if "error" in result:
            lines.append(f"ERROR: {result['error']}")
        elif name == "device":
            lines.extend(f"{key}: {value}" for key, value in result.items())
        elif name == "correctness":
            table = [[r["shape"], r["options"], r["dtype"], "  ".join(r["errors"]), "ok" if r["passed"] else "FAIL"]
                     for r in result["cases"]]
            lines.append(format_table(table, ("shape", "options", "dtype", "errors (v, grad u, grad W, grad b, fd)", "")))
            lines.append(f"bitwise repeatable at {result['repeat_shape']}: {result['bitwise_repeatable']}; "
                         f"torch.compile vs eager: {result['compiled_vs_eager_error']:.1e}")
            for row in result["tf32x3"]:
                lines.append(f"tf32x3 (not the default) at {row['shape']} {row['options']}: "
                             f"{'  '.join(row['errors'])} (v, grad u, grad W, grad b); within 1e-4: "
                             f"{row['within_float32_tolerance']}")
        elif name.startswith("time-"):
            lines.append(report.table(result["records"]))
        elif name == "profile":
            for batch, rows in result["tables"].items():
                lines.append(f"-- {batch}, {result['per_step_of']}")
                lines.append(format_table([[r["name"][:60], str(r["calls"]), f"{r['device_us_per_step']:.1f}",
                                            f"{r['cpu_us_per_step']:.1f}"] for r in rows],
                                          ("kernel / op", "calls", "device us", "cpu us")))
        else:
            lines.extend(f"{key}: {value}" for key, value in result.items())
        lines.append("")
    return "\n".join(lines)


def _write(out: str, options: dict, groups: Dict[str, dict]) -> None:
    os.makedirs(out, exist_ok=True)
    contents = json.dumps({"options": options, "groups": groups}, indent=1)
    for name, text in ((JSON_NAME, contents), (TEXT_NAME, _text(groups))):
        temporary = os.path.join(out, name + ".part")
        with open(temporary, "w") as file:
            file.write(text)
        os.replace(temporary, os.path.join(out, name))  # a time-out never leaves half a file


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "results"),
                        help="folder of gpu-session.json and .txt (default: $OUT, else benchmarks/results)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1")
    parser.add_argument("--batch", action="append", type=_positive, help="repeatable; default 1, 32, 128, 512")
    parser.add_argument("--mode", action="append", choices=bench.MODES, help="repeatable; default both")
    parser.add_argument("--provider", action="append", choices=("reference", "reference-compiled", "triton"),
                        help="repeatable; default all three (reference is always timed: the ratios' denominator)")
    parser.add_argument("--rounds", type=_positive, default=9, help="timed rounds per group, at least (default 9)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per timing group (default 2)")
    parser.add_argument("--profile-batch", action="append", type=_positive, help="repeatable; default 1, 128")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes everywhere (the test, under the interpreter)")
    parser.add_argument("--redo", action="store_true", help="run every group again, even those in --out")
    args = parser.parse_args(argv)
    args.batch = args.batch or [1, 32, 128, 512]
    args.mode = args.mode or list(bench.MODES)
    args.provider = ["reference", *[p for p in (args.provider or ["reference-compiled", "triton"]) if p != "reference"]]
    args.profile_batch = args.profile_batch or [1, 128]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (use --device cpu with TRITON_INTERPRET=1)")
    if "triton" not in fastcaps.available_backends(args.device):
        parser.error(f"--device {args.device}: the Triton kernels cannot run here (triton missing, or a CPU "
                     "without TRITON_INTERPRET=1 set before the import)")
    return args


def main(argv: List[str]) -> int:
    args = parse(argv)
    path = os.path.join(args.out, JSON_NAME)
    groups: Dict[str, dict] = {}
    options = {"device": args.device, "smoke": args.smoke}
    if os.path.exists(path) and not args.redo:
        with open(path) as file:
            saved = json.load(file)
        if saved.get("options") != options:
            print(f"{path} holds results made with {saved.get('options')}, not {options}: give --redo to replace "
                  "them, or another --out", file=sys.stderr)
            return 2
        groups = {name: result for name, result in saved["groups"].items() if "error" not in result}
    plan = [("device", device_group), ("correctness", correctness_group), ("graph", graph_group)]
    plan += [(f"time-{mode}-B{batch}", lambda a, m=mode, b=batch: timing_group(a, m, b))
             for mode in args.mode for batch in args.batch]
    plan += [(f"time-{case}-forward+backward-B{batch}",
              lambda a, b=batch, c=case: timing_group(a, "forward+backward", b, c))
             for case, batches in (("conv", CONV_BATCHES), ("votes", VOTES_BATCHES))
             for batch in ((1,) if args.smoke else batches)]
    plan += [("profile", profile_group)]
    workloads.raise_recompile_limit()
    started, failed = time.perf_counter(), 0
    for name, run in plan:
        if name in groups and name != "device":
            print(f"{name}: in {path} already, skipped", flush=True)
            continue
        group_started = time.perf_counter()
        try:
            result = run(args)
        except Exception:  # noqa: BLE001  (recorded, and the next group still runs)
            result = {"error": traceback.format_exc(limit=4)}
        result["seconds"] = round(time.perf_counter() - group_started, 1)
        failed += "error" in result or result.get("passed") is False
        groups[name] = result
        _write(args.out, options, groups)
        state = "ERROR" if "error" in result else {True: "passed", False: "FAILED"}.get(result.get("passed"), "done")
        print(f"{name}: {state} in {result['seconds']:.1f} s (total {time.perf_counter() - started:.0f} s)", flush=True)
    print(f"wrote {path} and {os.path.join(args.out, TEXT_NAME)}; {failed} group(s) failed or erred")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
