"""``fastcaps check``: passes on the real backends and fails loudly on a wrong one."""

import subprocess
import sys

import torch

import fastcaps
from fastcaps.cases import RoutingShape
from fastcaps.kernels.torch import dynamic_routing as torch_kernels
from fastcaps.tools import check, cli


def test_check_command_passes_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "fastcaps", "check", "--dtype", "float64"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend" in result.stdout and "grad W" in result.stdout
    assert "0 failed" in result.stdout
    for backend in ("reference", "torch"):
        assert f"\n{backend} " in result.stdout


def _off_by_a_little(u, weight, bias, iterations, detach_routing, leaky):
    v, s, kept_u_hat = torch_kernels.routing_forward(u, weight, bias, iterations, detach_routing, leaky)
    return v * (1 + 1e-3), s, kept_u_hat


def test_a_wrong_kernel_fails_the_check_and_the_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(torch_kernels, "KERNELS", torch_kernels.KERNELS._replace(forward=_off_by_a_little))
    row = check.check_case("torch", check.Case(RoutingShape(2, 7, 3, 3, 5), 2, False, True), torch.float32)
    assert not row.passed and row.error_v > 1e-4
    assert cli.main(["check", "--backend", "torch", "--dtype", "float32"]) == 1
    assert "FAILED: torch" in capsys.readouterr().out


def test_a_wrong_gradient_is_caught_by_the_finite_difference_too(monkeypatch):
    def wrong_backward(*args):
        grad_u, grad_weight, grad_bias = torch_kernels.routing_backward(*args)
        return grad_u, grad_weight * 1.01, grad_bias

    monkeypatch.setattr(torch_kernels, "KERNELS", torch_kernels.KERNELS._replace(backward=wrong_backward))
    row = check.check_case("torch", check.Case(RoutingShape(2, 7, 3, 3, 5), 3, False, False), torch.float64)
    assert not row.passed and row.error_fd > check.FD_TOLERANCE


def test_check_has_em_rows_for_the_backends_with_an_em_kernel():
    from fastcaps.tools import check_em
    cases = check_em.em_cases()[:2] + check_em.em_cases()[-2:]
    rows = check_em.run_em(["reference", "torch", "cpu", "triton"], [torch.float64, torch.float32], cases)
    with_kernels = {"torch", "cpu"} & set(fastcaps.available_backends("cpu"))  # not triton's interpreter: no EM kernel
    assert len(rows) == 8 * len(with_kernels) and {row.backend for row in rows} == with_kernels
    assert all(row.passed for row in rows)
    assert all(len(row.errors) == 7 and max(row.errors) < 1e-4 for row in rows)
    assert "g beta_a" in check_em.summary(rows)
