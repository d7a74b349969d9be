"""The Triton kernels ("triton" backend) against the reference.

Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small odd shapes because the interpreter is slow; the CUDA tests at
the MNIST shape run where a GPU is present. Ahead-of-time compilation for sm_80 and sm_90
checks what the interpreter cannot: that every kernel compiles for a real GPU, and fits in
registers, at every configuration the launcher can pick.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import fastcaps
from fastcaps import backends
from fastcaps.cases import RoutingShape, VotesShape, make_inputs
from fastcaps.tools import check

pytestmark = pytest.mark.skipif(
    "triton" not in fastcaps.available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason="the Triton kernels cannot run here (triton missing, or no GPU and no interpreter)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Odd shapes: single capsules, non-powers of two, and B = 17, which takes the 16-sample
# tl.dot configuration and leaves a 1-sample block.
SMALL_SHAPES = [RoutingShape(1, 1, 1, 1, 1), RoutingShape(3, 7, 3, 3, 5), RoutingShape(2, 33, 4, 4, 12),
                RoutingShape(17, 9, 8, 10, 16)]
OPTIONS = [(r, detach, bias) for r, detach, bias in itertools.product((1, 2, 3), (False, True), (False, True))
           if not (r == 1 and detach)]  # r = 1 with detach is r = 1 without it
OPTIONS += [(2, False, True, True), (3, True, False, True)]  # leaky routing: only the softmax differs


def _options_id(o):
    return f"r{o[0]}{'-detach' if o[1] else ''}{'-bias' if o[2] else ''}{'-leaky' if o[3:] == (True,) else ''}"


@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: str(s).replace(" ", "-"))
def test_values_and_gradients_match_the_reference(shape, options):
    case = check.Case(shape, *options)
    seed = SMALL_SHAPES.index(shape) * 100 + OPTIONS.index(options)
    oracle = check.oracle_for(case, seed)
    for dtype in (torch.float32, torch.float64):
        row = check.check_case("triton", case, dtype, seed, oracle, device=DEVICE)
        assert row.passed, check.format_row(row)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [RoutingShape(3, 7, 3, 3, 5), RoutingShape(17, 40, 4, 5, 8)],
                         ids=["small-blocks", "tl.dot"])
def test_half_inputs_accumulate_in_float32(shape, dtype):
    """check.half_check: within twice the half-dtype reference's own error, dtypes kept."""
    result = check.half_check("triton", shape, dtype, device=DEVICE)
    assert result["passed"], result


def _inputs(shape, dtype=torch.float32, seed=0):
    return list(make_inputs(shape, seed, bias=True, dtype=dtype, device=DEVICE))


def _forward_backward(u, weight, bias, grad_v, backend="triton"):
    leaves = [t.detach().clone().requires_grad_() for t in (u, weight, bias)]
    v = fastcaps.dynamic_routing(*leaves, iterations=3, backend=backend)
    return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]


def _without_interpreter() -> dict:
    """The environment for a child process that compiles or rejects, rather than interprets."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.parametrize("processors", [1, 3, 40])
def test_capsule_chunks_sum_to_the_same_result(processors, monkeypatch):
    """The partition into chunks (one per program) changes only the order of float32 sums,
    and each partition is deterministic: the same call twice gives the same bits."""
    from fastcaps.kernels.triton import configs

    monkeypatch.setattr(configs, "processors", lambda device: processors)
    inputs = _inputs(RoutingShape(3, 29, 3, 4, 6))
    block = configs.pass_config(3, torch.float32, RoutingShape(3, 29, 3, 4, 6)).block_b
    per_chunk, chunks = configs.capsule_chunks(3, 29, block, processors)
    assert chunks == {1: 2, 3: 6, 40: 29}[processors] and per_chunk * chunks >= 29
    first, second = _forward_backward(*inputs), _forward_backward(*inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    expected = _forward_backward(*inputs, backend="reference")
    for value, ref in zip(first, expected):
        torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-5)


def test_capsule_chunks_cover_every_capsule_once():
    from fastcaps.kernels.triton.configs import capsule_chunks

    for batch, in_caps, block, processors in itertools.product((1, 5, 64, 512), (0, 1, 7, 1152), (1, 16), (1, 132)):
        per_chunk, chunks = capsule_chunks(batch, in_caps, block, processors)
        assert per_chunk >= 1 and chunks >= 1
        assert per_chunk * chunks >= in_caps and per_chunk * (chunks - 1) < max(in_caps, 1)


# Sizes past 2^31 samples or capsules (2^33 + 5 samples of one float32 capsule is 34 GB of
# u alone): the launch arithmetic is checked without allocating, and the splitting itself
# runs below with a small MAX_LAUNCH_ROWS.
@pytest.mark.parametrize("count", [1, 2 ** 30, 2 ** 30 + 1, 2 ** 31 - 1, 2 ** 31, 2 ** 33 + 5])
def test_launches_past_2_31_rows_are_split_within_cuda_grid_limits(count):
    from fastcaps.kernels.triton.configs import MAX_GRID_X, MAX_GRID_Y, MAX_LAUNCH_ROWS, launch_ranges, pass_plan

    for dtype, processors, in_caps in itertools.product((torch.float32, torch.float64), (1, 132, 2000),
                                                        (1, 1152, 2 ** 31 + 3)):
        plan = pass_plan(RoutingShape(count, in_caps, 8, 10, 16), dtype, processors)
        assert plan.per_chunk * plan.chunks >= in_caps
        ranges = launch_ranges(count, plan.config.block_b)
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(stop == next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
        assert all(start % plan.config.block_b == 0 for start, _ in ranges)
        for start, stop in ranges:
            rows = stop - start
            assert 1 <= rows <= MAX_LAUNCH_ROWS <= MAX_GRID_X  # the reduction and final grids: a program per row
            blocks, chunks = plan.grid(rows)
            assert blocks <= MAX_GRID_X and chunks <= MAX_GRID_Y
            assert blocks * plan.config.block_b < 2 ** 31  # program id x BLOCK_B, taken in int32


@pytest.mark.parametrize("shape", [RoutingShape(5, 7, 3, 3, 5), RoutingShape(33, 5, 2, 4, 6)],
                         ids=["blocks-of-4", "tl.dot"])
def test_split_launches_give_the_same_bits(shape, monkeypatch):
    """At most 2 samples (rounded up to a whole sample block: 4 and 16 here) and 2 capsules
    per launch: every kernel runs several times, on views into the batch, and the
    results equal one launch's. A launch starts on a block boundary, so every sample keeps
    its row in its program's tile (configs.launch_ranges says why that matters)."""
    from fastcaps.kernels.triton import configs

    inputs = _inputs(shape, seed=3)
    whole = _forward_backward(*inputs)
    block = configs.pass_config(shape.batch, torch.float32, shape).block_b
    monkeypatch.setattr(configs, "MAX_LAUNCH_ROWS", 2)
    assert len(configs.launch_ranges(shape.batch, block)) >= 2 and len(configs.launch_ranges(shape.in_caps)) > 2
    for a, b in zip(whole, _forward_backward(*inputs)):
        assert torch.equal(a, b)


MNIST = RoutingShape(1, 1152, 8, 10, 16)
LARGE_CAPSULES = RoutingShape(1, 1152, 16, 32, 32)


def test_launch_configuration_depends_on_the_shape_only():
    from fastcaps.kernels.triton.configs import PassConfig, pass_config, pass_configs

    assert pass_config(1, torch.float32, MNIST).block_b == 1
    assert pass_config(17, torch.float32, MNIST).block_b == 16
    assert pass_config(128, torch.float16, MNIST).block_b == 16
    assert pass_config(128, torch.float64, MNIST).block_b == 1
    assert {pass_config(b, torch.float32, MNIST) for b in range(1, 600)} == set(pass_configs(MNIST, torch.float32))
    # The MNIST table as the ahead-of-time compile chose it (4 warps up to 8 samples).
    assert pass_configs(MNIST, torch.float32) == [PassConfig(1, 4), PassConfig(2, 4), PassConfig(4, 4),
                                                   PassConfig(8, 4), PassConfig(16, 8)]


def test_launch_configuration_scales_with_the_capsule_dimensions():
    """(J, D, Din) = (32, 32, 16): W[:, i] is 16,384 values, more than a program's registers
    hold beside its state; the table takes smaller sample blocks on 8 warps, no tl.dot, W in
    tiles of 2 input features (1 in float64), and phase B streams W and grad W. No
    configuration takes more than 8 warps (a block's registers are the same on 16, and 16
    warps cap a thread at 128)."""
    from fastcaps.kernels.triton import configs

    assert configs.pass_configs(LARGE_CAPSULES, torch.float32) == [configs.PassConfig(b, 8) for b in (1, 2, 4)]
    assert configs.din_tile(LARGE_CAPSULES, torch.float32, False) == 2
    assert configs.din_tile(LARGE_CAPSULES, torch.float64, False) == 1
    assert configs.din_tile(MNIST, torch.float32, False) == 8 and configs.din_tile(MNIST, torch.float32, True) == 16
    plan = configs.final_plan(LARGE_CAPSULES.with_batch(128), torch.float32, 132)
    assert plan.config.block_b == 1 and not plan.w_resident
    assert configs.final_plan(MNIST.with_batch(128), torch.float32, 132).w_resident
    for shape in (MNIST, LARGE_CAPSULES, RoutingShape(1, 9, 3, 3, 5), RoutingShape(1, 9, 64, 128, 64)):
        for _, launch in configs.launch_configurations(shape):
            assert launch.num_warps in (4, 8)
            assert launch.constexprs.get("DIN_TILE", 1) <= launch.constexprs.get("DIN_PAD", 1)


def test_final_kernel_plan_covers_the_batch_in_whole_blocks():
    from fastcaps.kernels.triton.configs import MAX_FINAL_SPLITS, MAX_GRID_Y, final_config, final_plan

    assert final_config(15, torch.float32, MNIST).block_b == 1 and final_config(16, torch.float32, MNIST).block_b == 16
    assert final_config(512, torch.float64, MNIST).block_b == 1
    assert final_plan(MNIST.with_batch(128), torch.float32, 132).splits == 1  # MNIST: 1152 programs fill an H100
    for batch, in_caps, processors, dtype in itertools.product((1, 5, 16, 17, 128, 4097), (1, 7, 1152), (1, 40, 132),
                                                               (torch.float32, torch.float64)):
        plan = final_plan(RoutingShape(batch, in_caps, 8, 10, 16), dtype, processors)
        assert plan.samples_per_split % plan.config.block_b == 0
        assert 1 <= plan.splits <= min(MAX_FINAL_SPLITS, MAX_GRID_Y)
        assert plan.splits * plan.samples_per_split >= batch > (plan.splits - 1) * plan.samples_per_split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach", [False, True], ids=["", "detach"])
def test_large_capsules_take_w_in_tiles_and_stream_phase_b(dtype, detach, monkeypatch):
    """(J, D, Din) = (32, 32, 9): the passes form u_hat from W tiles of a few input features
    (the last one partly masked) and phase B streams W and sums grad W in memory, here over
    two splits of the batch: values and gradients against the float64 reference, and the
    same bits twice."""
    from fastcaps.kernels.triton import configs

    shape = RoutingShape(3, 4, 9, 32, 32)
    assert configs.din_tile(shape, dtype, False) < configs.padded(shape.in_dim)
    monkeypatch.setattr(configs, "processors", lambda device: 3)  # 3 x 4 programs wanted: 3 splits
    plan = configs.final_plan(shape, dtype, 3)
    assert not plan.w_resident and plan.splits >= 2
    case = check.Case(shape, 2, detach, True)
    row = check.check_case("triton", case, dtype, seed=7, device=DEVICE)
    assert row.passed, check.format_row(row)
    inputs = _inputs(shape, seed=8, dtype=dtype)
    first, second = _forward_backward(*inputs), _forward_backward(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", [RoutingShape(5, 6, 3, 4, 6), RoutingShape(17, 5, 8, 10, 16)],
                         ids=["one-sample-steps", "tl.dot"])
def test_final_kernel_split_over_the_batch(shape, monkeypatch):
    """With few input capsules phase B splits the batch (grid axis 1) and adds the splits'
    grad W partials: the same values as one program per capsule, bitwise repeatable."""
    from fastcaps.kernels.triton import configs

    inputs = _inputs(shape, seed=5)
    assert configs.final_plan(shape, torch.float32, 1).splits == 1
    whole = _forward_backward(*inputs)
    monkeypatch.setattr(configs, "processors", lambda device: 40)
    assert configs.final_plan(shape, torch.float32, 40).splits >= 2
    split, again = _forward_backward(*inputs), _forward_backward(*inputs)
    for a, b, c in zip(whole, split, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c)


# detach's gradient is a stop-gradient, not the derivative: the check cases test it against
# the frozen-coupling forward. fast_mode projects on random directions: the interpreter is slow.
@pytest.mark.parametrize("iterations", [1, 3])
def test_gradcheck_float64(iterations):
    u, weight, bias, _ = _inputs(RoutingShape(2, 5, 2, 3, 4), torch.float64)
    inputs = [t.requires_grad_() for t in (u, weight, bias)]

    def route(u, weight, bias):
        return fastcaps.dynamic_routing(u, weight, bias, iterations, backend="triton")

    assert torch.autograd.gradcheck(route, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_opcheck():
    u, weight, bias, grad_v = _inputs(RoutingShape(3, 5, 2, 4, 3), torch.float32)
    torch.library.opcheck(torch.ops.fastcaps.routing.default, (u, weight, bias, 3, False, True, "triton"))
    v, s, kept_u_hat = torch.ops.fastcaps.routing(u, weight, bias, 3, False, False, "triton")
    assert kept_u_hat.numel() == 0  # the Triton backward recomputes u_hat
    torch.library.opcheck(torch.ops.fastcaps.routing_backward.default,
                          (grad_v, u, weight, bias, s, kept_u_hat, 3, False, False, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    u, weight, bias, grad_v = _inputs(RoutingShape(3, 7, 3, 3, 5))

    def step(u, weight, bias):
        return fastcaps.dynamic_routing(u, weight, bias, 3, backend="triton").square().sum()

    compiled = torch.compile(step, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (u, weight, bias)]
    compiled_leaves = [t.clone().requires_grad_() for t in (u, weight, bias)]
    eager_loss, compiled_loss = step(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(eager_loss, eager_leaves), torch.autograd.grad(compiled_loss, compiled_leaves)):
        torch.testing.assert_close(b, a)


def test_empty_batch():
    u, weight, bias, _ = _inputs(RoutingShape(2, 5, 2, 3, 4))
    u = u[:0].requires_grad_()
    weight.requires_grad_()
    v = fastcaps.dynamic_routing(u, weight, bias, backend="triton")
    assert v.shape == (0, 3, 4)
    v.sum().backward()
    assert u.grad.shape == u.shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_squash_is_finite_for_zero_and_huge_inputs():
    """u = 0 makes s = 0 (squash and its gradient at exactly zero); huge W makes |s| ~ 1e30."""
    u, weight, _, grad_v = _inputs(RoutingShape(2, 5, 2, 3, 4))
    for u_, w_ in ((torch.zeros_like(u), weight), (u, weight * 1e30)):
        value, *grads = _forward_backward(u_, w_, torch.zeros(3, 4, device=DEVICE), grad_v)
        assert all(torch.isfinite(t).all() for t in (value, *grads))
        # The reference's textbook squash overflows at 1e30; the "torch" kernel shares ours.
        torch.testing.assert_close(value, fastcaps.dynamic_routing(u_, w_, torch.zeros(3, 4, device=DEVICE),
                                                                   backend="torch"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error without the interpreter")
def test_cpu_tensors_without_the_interpreter_say_how_to_run():
    program = (
        "import torch, fastcaps\n"
        "try:\n"
        "    fastcaps.dynamic_routing(torch.randn(2, 3, 4), torch.randn(5, 3, 6, 4), backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "print('auto:', fastcaps.backends.resolve_backend('auto', torch.device('cpu')))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=_without_interpreter(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backend='triton' cannot run on cpu" in result.stdout and "TRITON_INTERPRET=1" in result.stdout
    assert "auto: cpu" in result.stdout or "auto: torch" in result.stdout


def test_auto_never_takes_the_interpreter():
    assert backends.resolve_backend("auto", torch.device("cpu")) != "triton"
    assert backends.auto_order(torch.device("cuda"))[0] == "triton"


def test_launch_check_counts_registers_per_block():
    """CUDA gives a block 65,536 registers, allocated 256 per warp: 169 registers per thread
    allow 11 warps, so a 16-warp program that ptxas let take 169 cannot launch."""
    from fastcaps.tools.aot import max_threads_per_block

    assert max_threads_per_block(169) == 352
    assert max_threads_per_block(255) == 256 and max_threads_per_block(256) == 256
    assert max_threads_per_block(128) == 512 and max_threads_per_block(32) == 1024


@pytest.mark.slow
def test_ahead_of_time_compilation_for_sm80_and_sm90_without_spills(tmp_path):
    """Every kernel at every launch configuration for the MNIST capsule dimensions compiles
    to a cubin for sm_80 and sm_90, generic and as recorded runs specialise it (constant 1,
    16-divisible arguments), keeps its registers (no local-memory spills) and can launch."""
    report = tmp_path / "aot.json"
    result = subprocess.run([sys.executable, "-m", "fastcaps", "aot", "--json", str(report)],
                            capture_output=True, text=True, env=_without_interpreter(), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = json.loads(report.read_text())
    kernels = {(r["kernel"], r["arch"], r["specialisation"] == "generic") for r in compiled}
    for arch in (80, 90):
        for name in ("routing_pass", "forward_reduce", "backward_reduce", "routing_final", "votes_pass",
                     "votes_gradient"):
            assert (name, arch, True) in kernels and (name, arch, False) in kernels
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 and r["launchable"] for r in compiled)
    assert any("USE_DOT=True" in r["options"] for r in compiled)
    assert any(r["specialisation"].startswith("1: batch") for r in compiled)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [(1, 1, 1), (3, 5, 3), (32, 32, 16)], ids=["J1-D1-Din1", "J3-D5-Din3", "J32-D32-Din16"])
def test_ahead_of_time_compilation_at_other_capsule_dimensions(dims):
    """Other capsule dimensions give other padded tiles (1-wide ones, tl.dot with 32 columns,
    and at (32, 32, 16) W in Din tiles and a streamed phase B): every configuration still
    compiles for sm_90 without spilling and can launch. The large shape also as recorded
    runs specialise it; the small ones generic only (CI time: both kinds are covered at
    the MNIST shape)."""
    out_caps, out_dim, in_dim = dims
    generic_only = ["--generic-only"] if dims != (32, 32, 16) else []
    result = subprocess.run([sys.executable, "-m", "fastcaps.tools.aot", "--arch", "90", "--out-caps", str(out_caps),
                             "--out-dim", str(out_dim), "--in-dim", str(in_dim), *generic_only],
                            capture_output=True, text=True, env=_without_interpreter(), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "; 0 spill to local memory; 0 cannot launch" in result.stdout


@cuda_only
@pytest.mark.parametrize("batch", [1, 128])
def test_mnist_shape_on_cuda(batch):
    case = check.Case(RoutingShape(batch, 1152, 8, 10, 16), 3, False, True)
    row = check.check_case("triton", case, torch.float32, seed=batch, device="cuda")
    assert row.passed, check.format_row(row)


@cuda_only
def test_cuda_results_are_bitwise_repeatable():
    inputs = _inputs(RoutingShape(64, 1152, 8, 10, 16))
    first, second = _forward_backward(*inputs), _forward_backward(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# Tensor methods that wait for the device: a value brought to the host, or a shape that
# depends on data.
_SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "unique", "__bool__", "__int__",
            "__float__", "__index__"}


def _syncing_calls(run) -> list:
    """The syncing tensor methods fastcaps' own code calls while ``run()`` runs (the
    interpreter itself copies tensors to the host: its calls, from triton's files, are not
    counted)."""
    import inspect
    from torch.overrides import TorchFunctionMode

    package = os.path.dirname(os.path.abspath(fastcaps.__file__))
    calls = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in _SYNCING:
                for frame in inspect.stack()[1:]:
                    if os.sep + "torch" + os.sep not in frame.filename:
                        if frame.filename.startswith(package):
                            calls.append(f"{name} at {os.path.relpath(frame.filename, package)}:{frame.lineno}")
                        break
            return func(*args, **(kwargs or {}))

    with Watch():
        run()
    return calls


def test_the_launchers_call_nothing_that_syncs_with_the_device():
    """Forward+backward free of host syncs, so that it can be captured in a CUDA graph: no
    syncing tensor method is called from fastcaps' own code. The GPU script checks the same
    on CUDA with torch.cuda.set_sync_debug_mode("error")."""
    from fastcaps.kernels.triton import dynamic_routing as launchers

    u, weight, bias, grad_v = _inputs(RoutingShape(3, 7, 3, 3, 5))

    def run():  # the launchers themselves: the custom op's dispatch would hide them from the mode
        for detach in (False, True):
            v, s, kept = launchers.routing_forward(u, weight, bias, 3, detach, detach)
            launchers.routing_backward(grad_v, u, weight, bias, s, kept, 3, detach, detach)

    calls = _syncing_calls(run)
    assert not calls, calls


def test_float32_dot_precision_option(monkeypatch):
    """FASTCAPS_TRITON_FLOAT32_DOT=tf32x3 puts the passes' float32 tl.dot on tensor cores
    (phase B and half inputs stay IEEE); a bad value is refused by name. Under the interpreter
    tl.dot is numpy's float32 product whatever the precision, so this checks the plumbing;
    its error on a GPU is measured by benchmarks/gpu_session.py."""
    from fastcaps.kernels.triton import configs

    shape = RoutingShape(17, 9, 8, 10, 16)
    config = configs.pass_config(shape.batch, torch.float32, shape)
    assert configs.pass_launch(config, torch.float32, shape, False).constexprs["DOT_PRECISION"] == "ieee"
    monkeypatch.setenv(configs.FLOAT32_DOT_VARIABLE, "tf32x3")
    assert configs.pass_launch(config, torch.float32, shape, False).constexprs["DOT_PRECISION"] == "tf32x3"
    assert configs.pass_launch(config, torch.float16, shape, False).constexprs["DOT_PRECISION"] == "ieee"
    final = configs.final_launch(shape, False, configs.final_config(shape.batch, torch.float32, shape), torch.float32)
    assert final.constexprs["DOT_PRECISION"] == "ieee"
    row = check.check_case("triton", check.Case(shape, 3, False, True), torch.float32, seed=11, device=DEVICE)
    assert row.passed, check.format_row(row)
    monkeypatch.setenv(configs.FLOAT32_DOT_VARIABLE, "tf32")
    with pytest.raises(ValueError, match="FASTCAPS_TRITON_FLOAT32_DOT='tf32': expected one of ieee, tf32x3"):
        configs.pass_launch(config, torch.float32, shape, False)


@pytest.mark.parametrize("shape, options", [(check.CONV_SHAPES[0], (3, False, True, True)),
                                            (check.CONV_SHAPES[2], (2, True, False, False))],
                         ids=["stride2-padding-r3-bias-leaky", "dilated-r2-detach"])
def test_convolutional_routing_on_the_triton_kernels(shape, options):
    """conv_dynamic_routing runs the dense kernels on gathered windows (stride 2 and padding;
    a rectangular dilated window), against the float64 reference."""
    case = check.Case(shape, *options)
    oracle = check.oracle_for(case, 5)
    for dtype in (torch.float32, torch.float64):
        row = check.check_case("triton", case, dtype, 5, oracle, device=DEVICE)
        assert row.passed, check.format_row(row)


# Routing from given votes: (rows = batch x positions, I, J, D); 17 rows take a 16-row block
# and a 1-row block.
VOTES_CASES = [(VotesShape(2, 3, 7, 3, 5), (3, False, True, True)), (VotesShape(17, 1, 5, 3, 2), (2, True, False)),
               (VotesShape(1, 1, 1, 1, 1), (1, False, True))]


@pytest.mark.parametrize("shape, options", VOTES_CASES, ids=["r3-bias-leaky", "17-rows-r2-detach", "ones"])
def test_route_votes_on_the_triton_kernels(shape, options):
    """The votes passes (u_hat read, not predicted) and their phase B against the float64
    reference: v, grad votes and grad bias; float64 also against finite differences."""
    case = check.Case(shape, *options)
    oracle = check.oracle_for(case, 7)
    for dtype in (torch.float32, torch.float64):
        row = check.check_case("triton", case, dtype, 7, oracle, device=DEVICE)
        assert row.passed, check.format_row(row)


def _votes_forward_backward(votes, bias, grad_v, leaky=True, backend="triton"):
    leaves = [t.detach().clone().requires_grad_() for t in (votes, bias)]
    v = fastcaps.route_votes(*leaves, 3, leaky=leaky, backend=backend)
    return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]


def _votes_inputs(rows, in_caps, out_caps, out_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    votes = torch.randn(rows, in_caps, out_caps, out_dim, generator=generator, dtype=torch.float64) * 0.6
    bias = torch.randn(out_caps, out_dim, generator=generator, dtype=torch.float64) * 0.5
    grad_v = torch.randn(rows, out_caps, out_dim, generator=generator, dtype=torch.float64)
    return [t.to(dtype=dtype, device=DEVICE) for t in (votes, bias, grad_v)]


def test_route_votes_bits_are_repeatable_and_do_not_depend_on_launch_splits(monkeypatch):
    """The same call twice gives the same bits, and so does one cut into launches of at most
    2 rows (rounded up to whole row blocks) on views into the rows' buffers."""
    from fastcaps.kernels.triton import configs

    inputs = _votes_inputs(19, 9, 4, 6)
    whole = _votes_forward_backward(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(whole, _votes_forward_backward(*inputs)))
    monkeypatch.setattr(configs, "MAX_LAUNCH_ROWS", 2)
    block = configs.pass_plan(RoutingShape(19, 9, 1, 4, 6), torch.float32, 1, votes=True).config.block_b
    assert len(configs.launch_ranges(19, block)) >= 2
    assert all(torch.equal(a, b) for a, b in zip(whole, _votes_forward_backward(*inputs)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_votes_half_inputs_accumulate_in_float32(dtype):
    """Half votes: outputs and gradients keep the dtype, and each is within twice the error
    of the torch backend (which computes in float32 too) from the float64 reference."""
    votes, bias, grad_v = _votes_inputs(5, 11, 3, 4, dtype=torch.float64, seed=2)
    exact = _votes_forward_backward(votes, bias, grad_v, backend="reference")
    low = [t.to(dtype) for t in (votes, bias, grad_v)]
    got = _votes_forward_backward(*low)
    torch_got = _votes_forward_backward(*[t.cpu() for t in low], backend="torch")
    for value, reference, other in zip(got, exact, torch_got):
        assert value.dtype == dtype
        error = check.normwise_error(value.double().cpu(), reference.cpu())
        assert error <= max(2 * check.normwise_error(other.double(), reference.cpu()), 1e-3), error


def test_route_votes_gradcheck_and_opcheck():
    votes, bias, _ = _votes_inputs(2, 3, 2, 2, dtype=torch.float64, seed=4)  # small: each evaluation is 4 launches
    assert torch.autograd.gradcheck(lambda x, b: fastcaps.route_votes(x, b, 2, leaky=True, backend="triton"),
                                    (votes.clone().requires_grad_(), bias.clone().requires_grad_()),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)
    torch.library.opcheck(torch.ops.fastcaps.route_votes.default, (votes, bias, 2, False, True, "triton"))


def test_route_votes_launchers_call_nothing_that_syncs_with_the_device():
    from fastcaps.kernels.triton import route_votes as launchers

    votes, bias, grad_v = _votes_inputs(3, 7, 3, 5)

    def run():
        for detach in (False, True):
            _, s = launchers.votes_forward(votes, bias, 3, detach)
            launchers.votes_backward(grad_v, votes, s, 3, detach, detach)

    calls = _syncing_calls(run)
    assert not calls, calls


def test_auto_takes_the_triton_votes_kernel_on_cuda():
    from fastcaps import backends

    assert backends.has_kernel("triton", "route_votes")
    if torch.cuda.is_available():
        assert backends.resolve_backend("auto", torch.device("cuda"), "route_votes") == "triton"
