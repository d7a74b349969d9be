"""Compile every Triton kernel of the "triton" backend ahead of time, without a GPU, and
report what each compiled program needs: registers, shared memory and local-memory spills.

    fastcaps aot                     # MNIST shape, sm_80 and sm_90, a table
    fastcaps aot --json out.json     # (also: python -m fastcaps.tools.aot)

The configurations are the launcher's own: ``launch_configurations`` of
fastcaps/kernels/triton/configs.py lists every launch the launchers can make at the
capsule dimensions (every pass configuration a batch can pick, both pass directions, every
input dtype, the reduction and final kernels with each of their compile-time switches).
Routing from given votes (route_votes) is listed too, at the same J and D.
Each is compiled twice over: generic (every integer i32, no alignment hint: any batch,
any tensor) and as a real run specialises it. For the second, the launchers themselves run
on CPU tensors at a few batches, iteration counts and switches with the launch replaced by a
recorder, and each recorded call gets Triton's own runtime specialisation: an integer equal
to 1 becomes a constant, 16-divisible integers and 16-byte-aligned pointers get divisibility
hints (``native_specialize_impl``, what ``kernel[grid](...)`` calls); the processor count is
the architecture's (108 SMs on sm_80, an A100; 132 on sm_90, an H100/H200), so the chunks
and splits are a real run's.

Resource use comes from ``cuobjdump --dump-resource-usage`` on the cubin (the registers,
and LOCAL/STACK bytes, which are spills) and from Triton's metadata (dynamic shared memory).
A program fails the report when it spills, or when it could not launch: more threads than
its registers allow in one block (CUDA's 65,536 registers per block, allocated 256 per
warp; Triton raises OutOfResources at load for those) or more shared memory than the
architecture has. Run it without TRITON_INTERPRET: the interpreter replaces the kernels with
Python functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple
from unittest import mock

import torch

from ..cases import RoutingShape
from ..validation import compute_dtype
from .tables import format_table

ARCHS = (80, 90)
MNIST = RoutingShape(batch=1, in_caps=1152, in_dim=8, out_caps=10, out_dim=16)


class ArchLimits(NamedTuple):
    processors: int  # SMs of the GPU the specialised launches are planned for
    shared_bytes: int  # dynamic shared memory one block may take (the opt-in maximum)


# A100 (sm_80) and H100/H200 (sm_90), from NVIDIA's CUDA C++ Programming Guide, compute
# capabilities table: 163 KB and 227 KB of shared memory per block.
ARCH_LIMITS = {80: ArchLimits(108, 166912), 90: ArchLimits(132, 232448)}
REGISTERS_PER_BLOCK = 65536
REGISTER_UNIT_PER_WARP = 256
MAX_THREADS_PER_BLOCK = 1024

# The runs whose launches are recorded for the specialised compiles: batches 1 (a constant
# 1), 16 and 128 (16-divisible, tl.dot blocks), one and three iterations, every switch.
SPECIALISED_BATCHES = (1, 16, 128)
SPECIALISED_ITERATIONS = (1, 3)

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    options: str  # the compile-time switches and block sizes
    num_warps: int
    registers: int
    shared_bytes: int
    spill_bytes: int  # local memory (LOCAL + STACK): 0 unless registers spilled
    specialisation: str  # "generic", or the run's constants and 16-divisible arguments
    max_threads: int  # threads per block the registers allow
    launchable: bool  # its warps fit max_threads and its shared memory fits the arch


def max_threads_per_block(registers: int) -> int:
    """Threads one block can have at ``registers`` per thread (sm_80 and sm_90)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    return min(MAX_THREADS_PER_BLOCK, REGISTERS_PER_BLOCK // per_warp * 32)


def _signature(kernel, dtype: torch.dtype, constexprs: Dict[str, object], input_pointers) -> Dict[str, str]:
    acc = _TRITON_TYPE[compute_dtype(dtype)]
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (_TRITON_TYPE[dtype] if name in input_pointers else acc)
        else:
            signature[name] = "i32"
    return signature


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {key: int(value) for key, value in fields.items()}


class Program(NamedTuple):
    """One program to compile: a launch with its signature, constants and hints."""
    dtype: torch.dtype
    launch: object  # configs.Launch
    signature: Dict[str, str]
    constexprs: Dict[str, object]  # the launch's, plus arguments specialised to 1
    attrs: Dict[Tuple[int], list]
    specialisation: str


def generic_programs(shape: RoutingShape) -> Iterator[Program]:
    from ..kernels.triton import configs

    for dtype, launch in configs.launch_configurations(shape):
        signature = _signature(launch.kernel, dtype, launch.constexprs, configs.INPUT_DTYPE_POINTERS)
        yield Program(dtype, launch, signature, dict(launch.constexprs), {}, "generic")


def _recorded_launches(shape: RoutingShape, processors: int) -> Iterator[Tuple[torch.dtype, object, tuple]]:
    """(input dtype, launch, arguments) of every launch the launchers make in the SPECIALISED_* runs, with
    the launch itself replaced by a recorder (no kernel runs: the outputs are garbage)."""
    from ..kernels.triton import configs, dynamic_routing, route_votes

    recorded, run_dtype = [], []

    def record(launch, grid, *args):
        recorded.append((run_dtype[-1], launch, args))

    with mock.patch.object(dynamic_routing, "_run", record), mock.patch.object(route_votes, "_run", record), \
            mock.patch.object(configs, "processors", lambda device: processors):
        for dtype in configs.DTYPES:
            run_dtype.append(dtype)
            for batch in SPECIALISED_BATCHES:
                u = torch.zeros(shape.with_batch(batch).u_shape, dtype=dtype)
                weight = torch.zeros(shape.weight_shape, dtype=dtype)
                bias = torch.zeros(shape.out_caps, shape.out_dim, dtype=dtype)
                for iterations in SPECIALISED_ITERATIONS:
                    for detach_routing in (False, True):
                        for has_bias in (False, True):
                            # leaky is an int argument: 1 is specialised as a constant, 0 is not.
                            for leaky in (False, True):
                                v, s, kept = dynamic_routing.routing_forward(
                                    u, weight, bias if has_bias else None, iterations, detach_routing, leaky)
                                dynamic_routing.routing_backward(torch.zeros_like(v), u, weight, bias, s, kept,
                                                                 iterations, detach_routing, leaky)
                                # The same rows as votes (route_votes: J and D as here). Empty, not
                                # zeros: no kernel runs, and the recorder keeps every call's
                                # arguments, which as zeros reached 24 GB at (32, 32, 16) (1.2 GB
                                # of float64 votes at B = 128) and were killed in CI; untouched
                                # pages take none (1.5 GB peak).
                                votes = torch.empty(batch, shape.in_caps, shape.out_caps, shape.out_dim, dtype=dtype)
                                v, s = route_votes.votes_forward(votes, bias if has_bias else None, iterations, leaky)
                                route_votes.votes_backward(torch.zeros_like(v), votes, s, iterations, detach_routing,
                                                           leaky)
    return iter(recorded)


def specialised_programs(shape: RoutingShape, processors: int) -> Iterator[Program]:
    """The recorded launches as Triton specialises them at run time, each distinct one once."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    specialize = getattr(jit, "native_specialize_impl", None)
    if specialize is None:
        raise RuntimeError(f"fastcaps aot: this Triton has no triton.runtime.jit.native_specialize_impl "
                           f"(Triton 3.6 and 3.9 have it); cannot reproduce its runtime specialisation")
    seen = set()
    for dtype, launch, arguments in _recorded_launches(shape, processors):
        names = [name for name in launch.kernel.arg_names if name not in launch.constexprs]
        signature, constexprs, attrs, ones, aligned = {}, dict(launch.constexprs), {}, [], 0
        for index, (name, value) in enumerate(zip(names, arguments)):
            kind, hint = specialize(BaseBackend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
                ones.append(name)
            elif hint:
                attrs[(index,)] = BaseBackend.parse_attr(hint)
                aligned += 1
        for name in launch.constexprs:
            signature[name] = "constexpr"
        # Without the dtype: the half types' backward reductions are float32's programs.
        key = (launch.name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(attrs)), tuple(sorted(launch.compile_options.items())))
        if key in seen:
            continue
        seen.add(key)
        described = f"1: {','.join(ones) or '-'}; 16|: {aligned}/{len(names)}"
        yield Program(dtype, launch, signature, constexprs, attrs, described)


def compile_all(archs: Sequence[int] = ARCHS, shape: RoutingShape = MNIST,
                specialised: bool = True) -> List[Compiled]:
    """Compile every launch configuration for every arch, generic and (``specialised``) as
    recorded runs specialise them; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..kernels.triton.routing_jit import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("fastcaps aot: TRITON_INTERPRET=1 is set; the interpreter's kernels "
                           "cannot be compiled. Run without it.")
    results = []
    for arch in archs:
        limits = ARCH_LIMITS[arch]
        programs = list(generic_programs(shape))
        if specialised:
            programs += list(specialised_programs(shape, limits.processors))
        for program in programs:
            launch = program.launch
            source = ASTSource(fn=launch.kernel, signature=program.signature, constexprs=program.constexprs,
                               attrs=program.attrs)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options=launch.compile_options)
            except Exception as error:
                raise RuntimeError(f"{launch.name} {launch.constexprs} {program.dtype} "
                                   f"({program.specialisation}) failed to compile for sm_{arch}: {error}") from error
            usage = _resources(compiled.asm["cubin"])
            options = " ".join(f"{key}={value}" for key, value in launch.constexprs.items())
            threads = max_threads_per_block(usage["REG"])
            shared = compiled.metadata.shared
            results.append(Compiled(launch.name, arch, _TRITON_TYPE[program.dtype], options, launch.num_warps,
                                    usage["REG"], shared, usage.get("LOCAL", 0) + usage.get("STACK", 0),
                                    program.specialisation, threads,
                                    launch.num_warps * 32 <= threads and shared <= limits.shared_bytes))
    return results


def results_table(results: Sequence[Compiled]) -> str:
    header = ("kernel", "sm", "dtype", "options", "arguments", "warps", "regs", "max threads", "shared B",
              "spill B", "launches")
    return format_table([(r.kernel, r.arch, r.dtype, r.options, r.specialisation, r.num_warps, r.registers,
                          r.max_threads, r.shared_bytes, r.spill_bytes, "yes" if r.launchable else "NO")
                         for r in results], header)


def aot_command(args: argparse.Namespace) -> int:
    shape = RoutingShape(1, MNIST.in_caps, args.in_dim, args.out_caps, args.out_dim)
    results = compile_all(args.arch, shape, specialised=not args.generic_only)
    print(results_table(results))
    spilled = [r for r in results if r.spill_bytes]
    unlaunchable = [r for r in results if not r.launchable]
    specialised = sum(r.specialisation != "generic" for r in results)
    print(f"\n{len(results)} kernels compiled ({specialised} as run-time specialisations); "
          f"{len(spilled)} spill to local memory; {len(unlaunchable)} cannot launch")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    return 1 if spilled or unlaunchable else 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--out-caps", type=int, default=MNIST.out_caps)
    parser.add_argument("--out-dim", type=int, default=MNIST.out_dim)
    parser.add_argument("--in-dim", type=int, default=MNIST.in_dim)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--generic-only", action="store_true",
                        help="skip the run-time specialisations (constant 1, 16-divisible arguments)")
    parser.set_defaults(run=aot_command)


def add_parser(commands) -> None:
    _add_arguments(commands.add_parser("aot", help="compile the Triton kernels ahead of time for sm_80/sm_90 "
                                       "(no GPU needed): registers, shared memory, spills",
                                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcaps.tools.aot", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
