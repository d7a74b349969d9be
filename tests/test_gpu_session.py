"""benchmarks/gpu_session.py, the one-shot GPU script, in what a CPU can check: its arguments,
its groups at a tiny shape under the Triton interpreter, the files it writes, and that a rerun
skips what is done and redoes what erred."""

import importlib.util
import json
import pathlib

import pytest
import torch

import fastcaps

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif("triton" not in fastcaps.available_backends("cpu"),
                                reason="needs triton under the interpreter (TRITON_INTERPRET=1)")


def _script():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = ["--device", "cpu", "--smoke", "--batch", "1", "--rounds", "1", "--min-seconds", "0",
         "--mode", "forward+backward", "--provider", "triton", "--profile-batch", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "expected a positive integer, got 0"),
    (["--rounds", "-3"], "expected a positive integer, got -3"),
    (["--mode", "sideways"], "invalid choice"),
    (["--provider", "cpu"], "invalid choice"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().parse(["--device", "cpu", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        _script().parse([])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_smoke_run_writes_two_files_and_a_rerun_skips_what_is_done(tmp_path, monkeypatch, capsys):
    script = _script()
    assert script.main([*SMOKE, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-session.json", "gpu-session.txt"]
    saved = json.loads((tmp_path / "gpu-session.json").read_text())
    assert list(saved["groups"]) == ["device", "correctness", "graph", "time-forward+backward-B1",
                                     "time-conv-forward+backward-B1", "time-votes-forward+backward-B1", "profile"]
    correctness = saved["groups"]["correctness"]
    assert correctness["passed"] and correctness["bitwise_repeatable"] and len(correctness["cases"]) == 9
    assert correctness["tf32x3"][0]["within_float32_tolerance"]  # the interpreter's tl.dot is float32
    timing = saved["groups"]["time-forward+backward-B1"]["records"]
    assert [r["provider"] for r in timing] == ["reference", "triton"] and timing[1]["speedup"] > 0
    conv = saved["groups"]["time-conv-forward+backward-B1"]["records"]
    assert [r["provider"] for r in conv] == ["reference", "triton"] and conv[1]["case"] == "smoke-conv"
    votes = saved["groups"]["time-votes-forward+backward-B1"]["records"]
    assert [r["provider"] for r in votes] == ["reference", "triton"] and votes[1]["case"] == "smoke-votes"
    assert saved["groups"]["profile"]["tables"]["B2"]
    text = (tmp_path / "gpu-session.txt").read_text()
    assert "== correctness" in text and "torch.compile vs eager" in text
    assert all(p.stat().st_size < 16 * 2**20 for p in tmp_path.iterdir())

    # A rerun runs none of the groups done; one that erred runs again.
    saved["groups"]["profile"] = {"error": "Traceback: planted"}
    (tmp_path / "gpu-session.json").write_text(json.dumps(saved))

    def not_again(args):
        raise AssertionError("a group in --out ran again")

    for name in ("correctness_group", "graph_group", "timing_group"):
        monkeypatch.setattr(script, name, not_again)
    capsys.readouterr()
    assert script.main([*SMOKE, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "correctness: in" in printed and "profile: done" in printed
    assert "error" not in json.loads((tmp_path / "gpu-session.json").read_text())["groups"]["profile"]

    # Results of other options are not mixed in.
    assert script.main([*[a for a in SMOKE if a != "--smoke"], "--out", str(tmp_path)]) == 2
