"""The benchmark engine and report: counts, ratios, spreads, comparison, an end-to-end run."""

import json
import subprocess
import sys

import pytest
import torch

from fastcaps.backends import available_backends
from fastcaps.cases import RoutingShape
from fastcaps.tools import cli
from fastcaps.tools.bench import engine as bench
from fastcaps.tools.bench import report

MNIST = bench.CASES["mnist"]


def test_flop_counts_match_the_design_notes():
    # DESIGN.md section 6: per MNIST sample, u_hat 2 I J D Din = 2.95 MFLOP and routing
    # (r = 3) 2 (2r - 1) I J D = 1.84 MFLOP.
    u_hat, routing = 2 * 1152 * 10 * 16 * 8, 2 * 5 * 1152 * 10 * 16
    assert (u_hat, routing) == (2_949_120, 1_843_200)
    assert bench.flops(MNIST, 3, "forward") == u_hat + routing
    assert bench.flops(MNIST.with_batch(128), 3, "forward+backward") == 3 * 128 * bench.flops(MNIST, 3, "forward")


def test_conv_and_votes_cases_count_per_position_and_skip_providers_without_a_kernel():
    conv = bench.CASES["conv"].with_batch(2)
    # Per position: 288 children (32 types x 3 x 3), J = 32, D = 16, Din = 8; 196 positions.
    per_position = 2 * 288 * 32 * 16 * 8 + 2 * 5 * 288 * 32 * 16
    assert per_position == 3_833_856
    assert bench.flops(conv, 3, "forward") == 2 * 196 * per_position
    assert bench.flops(bench.CASES["votes"], 3, "forward") == 49 * 2 * 5 * 288 * 32 * 16  # votes given: no u_hat
    planned = bench.points(["votes", "conv", "em"], None, [3], ["forward"],
                           ["reference", "reference-compiled", "triton"])
    assert [(p.case, p.batch, p.provider) for p in planned if p.case == "votes"] == [
        (case, batch, provider) for case, batch in (("votes", 1), ("votes", 8))
        for provider in ("reference", "reference-compiled", "triton")]
    assert {p.batch for p in planned if p.case == "conv"} == {1, 8}
    assert {p.provider for p in planned if p.case == "em"} == {"reference", "reference-compiled"}  # no Triton EM kernel
    for point in planned:  # what the worker processes receive
        assert bench._point_from_json(json.loads(json.dumps(bench._point_to_json(point)))) == point


def _result(provider, seconds, peak=None, batch=32):
    return bench.Result(bench.Point("mnist", MNIST.with_batch(batch), 3, "forward", provider), seconds, 0.0, peak)


def test_speedup_is_the_median_of_round_by_round_ratios():
    results = [
        _result("reference", [0.10, 0.20, 0.12, 0.13, 0.14], peak=400),
        # Round 2 was slow for both: its ratio is still 2.
        _result("torch", [0.05, 0.10, 0.06, 0.065, 0.07], peak=100),
        _result("torch", [1.0, 1.0, 1.0], batch=128),  # another group, no reference in it
    ]
    records = report.rows(results)
    assert records[0]["speedup"] == 1.0
    torch_row = records[1]
    assert torch_row["speedup"] == pytest.approx(2.0)
    assert torch_row["speedup_low"] == pytest.approx(2.0) and torch_row["speedup_high"] == pytest.approx(2.0)
    assert torch_row["memory_vs_reference"] == 0.25
    assert records[2]["speedup"] is None
    assert "2.00x" in report.table(records)


def test_unpaired_samples_are_refused():
    with pytest.raises(ValueError, match="same rounds"):
        report.rows([_result("reference", [0.1, 0.2]), _result("torch", [0.1])])


def _write(path, speedup, low, high):
    row = {"case": "mnist", "mode": "forward", "batch": 32, "iterations": 3, "provider": "torch",
           "dtype": "float32", "speedup": speedup, "speedup_low": low, "speedup_high": high}
    path.write_text(json.dumps({"meta": {}, "results": [row]}))
    return str(path)


def test_compare_agrees_on_overlapping_spreads_only(tmp_path, capsys):
    a = _write(tmp_path / "a.json", 2.0, 1.8, 2.2)
    assert report.compare(a, _write(tmp_path / "b.json", 2.1, 1.9, 2.3)) == 0
    assert report.compare(a, _write(tmp_path / "c.json", 3.0, 2.8, 3.2)) == 1
    assert "DISAGREE" in capsys.readouterr().out


@pytest.mark.parametrize(
    "provider", ["reference", "reference-compiled"] + [b for b in available_backends("cpu") if b not in ("reference", "triton")]
)
@pytest.mark.parametrize("mode", bench.MODES)
def test_every_provider_runs_in_every_mode(provider, mode):
    runner = bench.make_runner(bench.Point("small", RoutingShape(3, 5, 3, 4, 6), 2, mode, provider))
    runner.run()
    assert runner.first_call_seconds > 0


def test_allocator_mode_is_set_on_glibc():
    assert bench.steady_state_allocator() is True


@pytest.mark.parametrize("processes", [[], ["--processes", "2"]], ids=["one-process", "2-per-group"])
def test_bench_command_end_to_end(tmp_path, capsys, processes):
    json_path, chart_path = tmp_path / "b.json", tmp_path / "b.png"
    code = cli.main(["bench", "--case", "small", "--batch", "1", "--batch", "4", "--mode", "forward",
                     "--provider", "torch", "--repeats", "3", "--min-seconds", "0", "--warmup", "0",
                     "--json", str(json_path), "--chart", str(chart_path), *processes])
    assert code == 0
    output = capsys.readouterr().out
    assert "correctness check" in output and "speed-up" in output
    assert ("every group in one worker process" in output) == (not processes)
    data = json.loads(json_path.read_text())
    assert data["meta"]["torch"] == torch.__version__ and "allocator" in data["meta"]
    assert {r["provider"] for r in data["results"]} == {"reference", "torch"}
    assert all(r["peak_mib"] is not None and len(r["samples_ms"]) >= 3 for r in data["results"])
    assert data["meta"]["method"] in output and data["meta"]["seconds"] > 0
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _planned(*arguments):
    from fastcaps.tools.bench import command

    return command.apply_method(cli.build_parser().parse_args(["bench", *arguments]))


def test_the_quick_default_and_the_full_method():
    quick = _planned()
    assert (quick.case, quick.batch, quick.iterations, quick.mode) == (["mnist"], [1, 128], [3], list(bench.MODES))
    assert quick.one_process and quick.memory_modes == ["forward+backward"] and quick.min_seconds == 2.0
    full = _planned("--full")
    assert full.batch == [1, 32, 128] and not full.one_process and full.processes == 3
    assert full.memory_modes == list(bench.MODES) and full.min_seconds == 4.0
    # Options given explicitly win over the method.
    assert not _planned("--processes", "2").one_process
    assert _planned("--mode", "forward").memory_modes == ["forward"]
    assert _planned("--no-memory").memory_modes == []
    assert _planned("--full", "--batch", "8").batch == [8]


def test_the_json_names_the_cpu_its_vector_flags_and_the_kernels_build():
    meta = report.machine()
    assert meta["cpu"] and "cpu_vector_flags" in meta and "cpu_family" in meta
    if "cpu" in available_backends("cpu"):
        from fastcaps.kernels.cpu import extension

        assert meta["cpu_kernels_build"] == extension.isa()
        if "avx2" in meta["cpu_vector_flags"] and "avx512f" not in meta["cpu_vector_flags"]:
            assert meta["cpu_kernels_build"] == "avx2"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11")
def test_workers_import_this_fastcaps_from_inside_another_checkout(tmp_path):
    """`python -m` puts the working directory first on a worker's path: started inside another
    fastcaps checkout, the workers imported that one's kernels (an older clone's, seen)."""
    (tmp_path / "fastcaps").mkdir()
    (tmp_path / "fastcaps" / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    completed = subprocess.run([sys.executable, "-m", "fastcaps.tools.bench.engine", "--no-such-flag"],
                               env=bench._worker_env(None), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "the other checkout" not in completed.stderr
    assert "usage: python -m fastcaps.tools.bench.engine" in completed.stderr, completed.stderr[-2000:]


def test_the_em_case_counts_votes_and_routing_and_runs_on_the_kernels_it_has():
    from fastcaps.cases import EMShape
    em = bench.CASES["em"]
    # The paper's ConvCaps1 on smallNORB: 6 x 6 windows of 288 children, J = 32, 4x4 poses.
    assert (em.windows, em.children) == (36, 288)
    per_vote = 2 * 64 + 5 * 3 * 16 + 4 * 2 * 16
    assert bench.flops(em, 3, "forward") == 36 * 288 * 32 * per_vote
    planned = bench.points(["em"], None, [3], ["forward"], ["reference", "torch", "cpu", "triton"])
    with_kernels = ("reference", *(p for p in ("torch", "cpu") if p in available_backends("cpu")))
    assert {(p.batch, p.provider) for p in planned} == {(b, p) for b in (1, 8, 32) for p in with_kernels}
    for point in planned:
        assert bench._point_from_json(json.loads(json.dumps(bench._point_to_json(point)))) == point
    small = EMShape(2, 3, 4, (5, 5), 4, (3, 3), (2, 2))
    for provider in ("reference-compiled", *with_kernels):
        for mode in bench.MODES:
            runner = bench.make_runner(bench.Point("em", small, 2, mode, provider))
            runner.run()
    dense = EMShape(2, 3, 4, (2, 3), 4, coordinate_addition=True)
    for provider in with_kernels[1:]:
        bench.make_runner(bench.Point("em", dense, 2, "forward+backward", provider)).run()
