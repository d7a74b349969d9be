"""Compile every Triton kernel of the "triton" backend ahead of time, without a GPU, and
report what each compiled program needs: registers, shared memory and local-memory spills.

    fastcaps aot                     # MNIST shape, sm_80 and sm_90, a table
    fastcaps aot --json out.json     # (also: python -m fastcaps.tools.aot)

The configurations are the launcher's own: ``launch_configurations`` of
fastcaps/kernels/triton/configs.py lists every launch the launchers can make at the
capsule dimensions (every pass configuration a batch can pick, both pass directions, every
input dtype, the reduction and final kernels with each of their compile-time switches).
Resource use comes from ``cuobjdump --dump-resource-usage`` on the cubin (the registers,
and LOCAL/STACK bytes, which are spills) and from Triton's metadata (dynamic shared memory).
Run it without TRITON_INTERPRET: the interpreter replaces the kernels with Python functions
that cannot be compiled.
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
from typing import Dict, List, Sequence

import torch

from ..cases import RoutingShape
from ..validation import compute_dtype
from .tables import format_table

ARCHS = (80, 90)
MNIST = RoutingShape(batch=1, in_caps=1152, in_dim=8, out_caps=10, out_dim=16)

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


def compile_all(archs: Sequence[int] = ARCHS, shape: RoutingShape = MNIST) -> List[Compiled]:
    """Compile every launch configuration for every arch; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..kernels.triton import configs
    from ..kernels.triton.routing_jit import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("fastcaps aot: TRITON_INTERPRET=1 is set; the interpreter's kernels "
                           "cannot be compiled. Run without it.")
    results = []
    for arch in archs:
        for dtype, launch in configs.launch_configurations(shape):
            signature = _signature(launch.kernel, dtype, launch.constexprs, configs.INPUT_DTYPE_POINTERS)
            source = ASTSource(fn=launch.kernel, signature=signature, constexprs=launch.constexprs)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options=launch.compile_options)
            except Exception as error:
                raise RuntimeError(f"{launch.name} {launch.constexprs} {dtype} failed to compile for sm_{arch}: "
                                   f"{error}") from error
            usage = _resources(compiled.asm["cubin"])
            options = " ".join(f"{key}={value}" for key, value in launch.constexprs.items())
            results.append(Compiled(launch.name, arch, _TRITON_TYPE[dtype], options, launch.num_warps, usage["REG"],
                                    compiled.metadata.shared, usage.get("LOCAL", 0) + usage.get("STACK", 0)))
    return results


def results_table(results: Sequence[Compiled]) -> str:
    header = ("kernel", "sm", "dtype", "options", "warps", "regs", "shared B", "spill B")
    return format_table([(r.kernel, r.arch, r.dtype, r.options, r.num_warps, r.registers, r.shared_bytes,
                          r.spill_bytes) for r in results], header)


def aot_command(args: argparse.Namespace) -> int:
    shape = RoutingShape(1, MNIST.in_caps, args.in_dim, args.out_caps, args.out_dim)
    results = compile_all(args.arch, shape)
    print(results_table(results))
    spilled = [r for r in results if r.spill_bytes]
    print(f"\n{len(results)} kernels compiled; {len(spilled)} spill to local memory")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    return 1 if spilled else 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--out-caps", type=int, default=MNIST.out_caps)
    parser.add_argument("--out-dim", type=int, default=MNIST.out_dim)
    parser.add_argument("--in-dim", type=int, default=MNIST.in_dim)
    parser.add_argument("--json", help="also write the results to this JSON file")
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
