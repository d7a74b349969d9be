"""Benchmark engine: one setup factory per case for every provider, timing and peak memory.

Used by ``fastcaps bench`` (tools/bench/command.py; report.py writes its table and JSON,
charts.py its charts) and by the pytest-benchmark suites in benchmarks/.

Providers are what the bench times: "reference" (the paper's loop, eager),
"reference-compiled" (``torch.compile`` of the same function: the strongest thing a user
can do without fastcaps; its compile time is excluded from the timing and reported
separately), and every fastcaps backend available on the device.

Timing: the providers of a group (same case, batch, depth, mode) run in interleaved
rounds (``measure_group``), in fresh processes (``measure_in_processes``): with several
processes per group their rounds are pooled, so that both a slow stretch of the machine
and what varies from process to process land inside the reported spread; with one process
for every group, torch is imported and the reference compiled once. On CPU the workers run
with glibc told to keep freed memory (``steady_state_allocator``): by default glibc maps
every allocation over 32 MiB fresh and unmaps it on free, so each call pays page faults
for u_hat (94 MB at the MNIST shape, B = 128) that a long-running training loop would
not. On CUDA the caching allocator already behaves this way, and the timed function
synchronizes.

Peak memory: CUDA, the allocator's peak over one call minus what was allocated before.
CPU, the steady-state peak RSS growth of one call in a fresh process (see
``peak_memory``); it counts every byte touched: tensors, autograd's saved state,
gradients, and library workspaces.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import site
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ...backends import auto_order, available_backends
from ...cases import ConvShape, EMShape, RoutingShape, VotesShape
from .workloads import SHAPES, provider_runs, workload

MODES = ("forward", "forward+backward")

# The capsule dimensions of each case; the batch comes from the grid (with_batch). "conv" and
# "votes" are opt-in (--case): their reference materializes 115 MB and 23 MB of votes per sample.
CASES: Dict[str, object] = {
    "small": RoutingShape(1, 288, 4, 5, 12),
    "mnist": RoutingShape(1, 1152, 8, 10, 16),  # the paper's DigitCaps
    "large": RoutingShape(1, 4608, 8, 10, 16),  # PrimaryCaps on 40x40 images: 32 x 12 x 12 capsules
    # 32 capsule types of 8D on 14 x 14, a 3 x 3 window, padding 1, 32 types of 16D out
    "conv": ConvShape(1, 32, 8, 14, 14, 32, 16, (3, 3), (1, 1), (1, 1)),
    # the votes of a 7 x 7 grid of such windows (288 children each), routed as given
    "votes": VotesShape(1, 49, 288, 32, 16),
    # the EM paper's ConvCaps1 on smallNORB: 32 types of 4x4 poses on 14 x 14, K = 3, stride 2, 32 types out
    "em": EMShape(1, 32, 32, (14, 14), 4, (3, 3), (2, 2)),
    # its ConvCaps2: 32 types on 6 x 6, K = 3, stride 1, 32 types out (4 x 4 windows)
    "em-stride1": EMShape(1, 32, 32, (6, 6), 4, (3, 3), (1, 1)),
    # its class capsules: 32 types on 4 x 4 to smallNORB's 5 classes, with coordinate addition
    "em-class": EMShape(1, 32, 5, (4, 4), 4, coordinate_addition=True),
}
# The batches of a case when --batch is not given, where the method's (up to 128) would not fit.
CASE_BATCHES: Dict[str, List[int]] = {"conv": [1, 8], "votes": [1, 8], "em": [1, 8, 32], "em-stride1": [1, 8, 32],
                                      "em-class": [1, 8, 32]}


@dataclass(frozen=True)
class Point:
    """One measurement: a shape (with its batch), a routing depth, a mode and a provider."""

    case: str
    shape: object  # RoutingShape, ConvShape or VotesShape (workloads.py)
    iterations: int
    mode: str
    provider: str
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def batch(self) -> int:
        return self.shape.batch

    @property
    def label(self) -> str:
        return f"{self.case} B{self.batch} r{self.iterations} {self.mode} {self.dtype}"


def providers(device: str = "cpu") -> List[str]:
    """The default providers on ``device``: the reference, its compiled form, and the kernels
    that ``backend="auto"`` may pick there."""
    available = available_backends(device)
    return ["reference", "reference-compiled"] + [b for b in auto_order(torch.device(device)) if b in available]


def flops(shape, iterations: int, mode: str) -> float:
    """DESIGN.md section 6's arithmetic of a call (workloads.routing_flops)."""
    return workload(shape).flops(shape, iterations, mode)


def point_inputs(point: Point, seed: int = 0) -> List[torch.Tensor]:
    """The point's leaves: (u, weight) for dynamic and convolutional routing, (votes,) for
    route_votes (workloads.py)."""
    return workload(point.shape).inputs(point.shape, seed, getattr(torch, point.dtype), point.device)


@dataclass
class Runner:
    """The timed function of one point, and what its first call cost."""

    run: Callable[[], None]
    first_call_seconds: float


def make_runner(point: Point) -> Runner:
    """The setup factory every provider and mode goes through: inputs, then a closure
    that runs one call (and synchronizes on CUDA). Its first call is made here, so
    compilation and autotuning are never timed."""
    leaves = point_inputs(point)
    route = workload(point.shape).route(point.provider, point.shape)
    synchronize = torch.cuda.synchronize if leaves[0].is_cuda else (lambda: None)
    if point.mode == "forward":
        def run():
            with torch.no_grad():
                route(*leaves, point.iterations)
            synchronize()
    elif point.mode == "forward+backward":
        for leaf in leaves:
            leaf.requires_grad_()

        def run():
            v = route(*leaves, point.iterations)
            torch.autograd.grad(v, leaves, torch.ones_like(v))
            synchronize()
    else:
        raise ValueError(f"mode must be one of {MODES}, got {point.mode!r}")
    started = time.perf_counter()
    run()
    return Runner(run, time.perf_counter() - started)


def matmul_rate(device: str = "cpu", dtype: str = "float32", size: int = 2048) -> float:
    """GFLOP/s of torch.mm on two size x size matrices, median of 5 after 2 warm-ups: the
    machine's practical arithmetic ceiling, which the kernels' rates (``flops``) are read
    against."""
    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    synchronize = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    seconds = []
    for round_ in range(7):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        if round_ >= 2:
            seconds.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(seconds) / 1e9


# --- allocator ---------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc malloc.h


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def steady_state_allocator() -> bool:
    """Make glibc keep freed memory for reuse (no mmap per allocation, no trimming), as a
    long-running process reaches. Returns False where this is not glibc (then timings
    include page faults, and the result records it)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# --- timing ------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quartiles(self):
        if len(self.seconds) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q1, q3


# --- peak memory -------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def peak_in_this_process(point: Point) -> int:
    """Peak memory growth of one call of ``point`` in this process (after a warm-up call):
    CUDA, the allocator's peak; CPU, the peak RSS growth (``peak_memory`` runs it in a fresh
    process, where that is meaningful)."""
    runner = make_runner(point)  # its first call is the warm-up
    if point.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run()
        return torch.cuda.max_memory_allocated() - before
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    runner.run()
    return (_status_kib("VmHWM") - before) * 1024


def peak_memory(point: Point, timeout: float = 900) -> int:
    """Peak memory growth of one call of ``point``, in bytes, measured in a fresh process.

    CPU method: the worker makes the call once (warm-up: lazy initialisation, thread pools,
    compilation), resets the kernel's peak-RSS counter, makes it again and reports the
    peak growth. glibc's mmap threshold is pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_) so
    each tensor-sized buffer is mapped and unmapped on its own, and freed memory leaves
    RSS instead of being reused unseen.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    return _run_worker("--memory-worker", _point_to_json(point), f"{point.label} {point.provider}", timeout, env)


def _worker_env(env: Optional[dict]) -> dict:
    """The environment of a worker, so that it imports this fastcaps: ``python -m`` would put
    the working directory first on its path, and run from inside another fastcaps checkout
    the workers timed that checkout's kernels while the table named this one's (seen).
    PYTHONSAFEPATH (Python 3.11+) drops the working directory; a source checkout's root is
    put on PYTHONPATH (an installed package is found as usual)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONSAFEPATH"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    site_dirs = {os.path.abspath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_worker(flag: str, payload, what: str, timeout: float, env: Optional[dict] = None):
    """Run ``python -m fastcaps.tools.bench.engine FLAG PAYLOAD`` in a fresh process; its last line of
    output, parsed as JSON."""
    result = subprocess.run([sys.executable, "-m", "fastcaps.tools.bench.engine", flag, json.dumps(payload)],
                            capture_output=True, text=True, env=_worker_env(env), timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{flag[2:]} for {what} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _point_to_json(point: Point) -> dict:
    return {**asdict(point), "shape_kind": type(point.shape).__name__}


def _point_from_json(fields: dict) -> Point:
    fields = dict(fields)
    shape_type = SHAPES[fields.pop("shape_kind", "RoutingShape")]
    shape = {key: tuple(value) if isinstance(value, list) else value for key, value in fields["shape"].items()}
    return Point(**{**fields, "shape": shape_type(**shape)})


# --- one measurement ---------------------------------------------------------------------


@dataclass
class Result:
    point: Point
    seconds: List[float]
    first_call_seconds: float
    peak_bytes: Optional[int]

    @property
    def timing(self) -> Timing:
        return Timing(self.seconds)

    @property
    def gflops(self) -> float:
        p = self.point
        return flops(p.shape, p.iterations, p.mode) / self.timing.median / 1e9


def interleaved_rounds(calls: Sequence[Callable[[], object]], repeats: int, min_seconds: float = 0.0,
                       before_each: Optional[Callable[[], object]] = None) -> List[List[float]]:
    """Seconds of each call, round by round: one call each per round, the order rotated every
    round; at least ``repeats`` rounds, more (up to 10x) until the rounds took
    ``min_seconds``. ``before_each`` runs untimed before every call (other work, so that a
    call finds the caches as a real step would leave them). Sample k of every list comes
    from round k, so ratios can be taken round by round: a slow stretch of the machine then
    slows every call alike instead of landing in their ratio."""
    samples: List[List[float]] = [[] for _ in calls]
    rounds, elapsed = 0, 0.0
    while rounds < repeats or (elapsed < min_seconds and rounds < 10 * repeats):
        for offset in range(len(calls)):
            index = (rounds + offset) % len(calls)
            if before_each is not None:
                before_each()
            started = time.perf_counter()
            calls[index]()
            seconds = time.perf_counter() - started
            samples[index].append(seconds)
            elapsed += seconds
        rounds += 1
    return samples


def measure_group(group: Sequence[Point], repeats: int, warmup: int = 1, min_seconds: float = 0.0) -> List[Result]:
    """Time the providers of one group in interleaved rounds (interleaved_rounds), after
    ``warmup`` untimed calls of each."""
    runners = [make_runner(point) for point in group]
    for _ in range(warmup):
        for runner in runners:
            runner.run()
    samples = interleaved_rounds([runner.run for runner in runners], repeats, min_seconds)
    return [Result(point, samples[i], runners[i].first_call_seconds, None) for i, point in enumerate(group)]


def measure_in_processes(groups: Sequence[Sequence[Point]], processes: int, repeats: int, warmup: int = 1,
                         min_seconds: float = 0.0, one_process: bool = False,
                         on_measured: Optional[Callable[[int], None]] = None) -> List[List[Result]]:
    """``measure_group`` for every group in fresh worker processes (steady-state allocator).

    By default each group gets ``processes`` processes of its own and their rounds are
    pooled: some variation is fixed per process (buffer addresses, where the threads land),
    and pooling puts it inside the reported spread instead of between two runs. Each process
    runs ceil(repeats / processes) rounds at least. With ``one_process`` a single process
    measures every group in turn (``processes`` is ignored): it imports torch and compiles
    once, but the process-to-process variation is then outside the spread. ``on_measured``
    is told how many more groups are done after each of them (or after the one process)."""
    groups = [list(group) for group in groups]
    samples = [[[] for _ in group] for group in groups]
    first_call = [[0.0 for _ in group] for group in groups]

    def run(indices: List[int], rounds: int, seconds: float) -> None:
        payload = {"groups": [[_point_to_json(point) for point in groups[g]] for g in indices],
                   "repeats": rounds, "warmup": warmup, "min_seconds": seconds}
        measured = _run_worker("--time-worker", payload, groups[indices[0]][0].label, timeout=3600)
        for g, times, firsts in zip(indices, measured["seconds"], measured["first_call_seconds"]):
            for i in range(len(groups[g])):
                samples[g][i].extend(times[i])
                first_call[g][i] = max(first_call[g][i], firsts[i])

    if one_process:
        run(list(range(len(groups))), repeats, min_seconds)
        if on_measured is not None:
            on_measured(len(groups))
    else:
        for g in range(len(groups)):
            for _ in range(processes):
                run([g], -(-repeats // processes), min_seconds / processes)
            if on_measured is not None:
                on_measured(1)
    return [[Result(point, samples[g][i], first_call[g][i], None) for i, point in enumerate(group)]
            for g, group in enumerate(groups)]


def _time_worker(payload: dict) -> dict:
    steady_state_allocator()
    seconds, first_calls = [], []
    for group in payload["groups"]:
        results = measure_group([_point_from_json(p) for p in group], payload["repeats"], payload["warmup"],
                                payload["min_seconds"])
        seconds.append([r.seconds for r in results])
        first_calls.append([r.first_call_seconds for r in results])
    return {"seconds": seconds, "first_call_seconds": first_calls}


def group_key(point: Point) -> tuple:
    """Points that differ only in provider share a group."""
    return (point.case, point.shape, point.iterations, point.mode, point.dtype, point.device)


def points(cases: Sequence[str], batches: Optional[Sequence[int]], iterations: Sequence[int],
           modes: Sequence[str], provider_names: Sequence[str], dtype: str = "float32",
           device: str = "cpu", default_batches: Sequence[int] = (1, 128)) -> List[Point]:
    """The grid, reference first within each group so ratios have their denominator. Without
    ``batches`` each case takes CASE_BATCHES' or ``default_batches``; providers with no kernel
    for a case's entry point (route_votes on "cpu") are left out of it."""
    return [
        Point(case, CASES[case].with_batch(batch), r, mode, provider, dtype, device)
        for case in cases for batch in (batches or CASE_BATCHES.get(case, default_batches))
        for r in iterations for mode in modes
        for provider in provider_names if provider_runs(provider, CASES[case])
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(peak_in_this_process(_point_from_json(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--time-worker":
        print(json.dumps(_time_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m fastcaps.tools.bench.engine --memory-worker POINT | --time-worker GROUPS "
                 "(internal JSON protocol); see `fastcaps bench`")
