"""Compile every Triton kernel of the "triton" backend ahead of time, without a GPU, and
report what each compiled program needs: registers, shared memory and local-memory spills.

    python -m fastcaps.triton_aot                 # MNIST shape, sm_80 and sm_90, a table
    python -m fastcaps.triton_aot --json out.json

The configurations are the launcher's own (fastcaps._routing_triton): every pass
configuration in PASS_CONFIGS that the launcher can pick for the shape, both pass
directions, every input dtype, and the reduction and final kernels with each of their
compile-time switches. Resource use comes from ``cuobjdump --dump-resource-usage`` on the
cubin (the registers, and LOCAL/STACK bytes, which are spills) and from Triton's metadata
(dynamic shared memory). Run it without TRITON_INTERPRET: the interpreter replaces the
kernels with Python functions that cannot be compiled.
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
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MNIST = dict(out_caps=10, out_dim=16, in_dim=8)

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# Pointers to tensors in the input dtype; every other pointer is in the compute dtype.
_INPUT_DTYPE_POINTERS = {"u_ptr", "w_ptr", "bias_ptr", "v_ptr", "grad_u_ptr", "grad_w_ptr"}


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


def _signature(kernel, dtype: torch.dtype, constexprs: Dict[str, object]) -> Dict[str, str]:
    acc = _TRITON_TYPE[torch.float64 if dtype == torch.float64 else torch.float32]
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (_TRITON_TYPE[dtype] if name in _INPUT_DTYPE_POINTERS else acc)
        else:
            signature[name] = "i32"
    return signature


def launch_configurations(out_caps: int, out_dim: int, in_dim: int) -> Iterator[Tuple]:
    """(kernel name, kernel, dtype, constexprs, num_warps) for every launch the launcher can
    make at these capsule dimensions (any batch, any number of input capsules)."""
    from . import _routing_triton as rt

    pads = dict(J_PAD=rt._padded(out_caps), D_PAD=rt._padded(out_dim))
    largest_block = max(config.block_b for config in rt.PASS_CONFIGS)
    for dtype in DTYPES:
        reachable = {rt.pass_config(batch, dtype) for batch in range(1, 2 * largest_block + 1)}
        for config in rt.PASS_CONFIGS:
            if config not in reachable:
                continue
            use_dot = rt._uses_dot(config, dtype, out_caps, out_dim)
            for backward in (False, True):
                yield ("routing_pass", rt._routing_pass_kernel, dtype,
                       dict(BACKWARD=backward, BLOCK_B=config.block_b, **pads,
                            DIN_PAD=rt._padded(in_dim, 16 if use_dot else 1), USE_DOT=use_dot),
                       config.num_warps)
        for has_bias in (False, True):
            yield ("forward_reduce", rt._forward_reduce_kernel, dtype,
                   dict(HAS_BIAS=has_bias, BLOCK_B=rt.REDUCE_CONFIG.block_b, **pads),
                   rt.REDUCE_CONFIG.num_warps)
        for detach in (False, True):
            yield ("routing_final", rt._routing_final_kernel, dtype,
                   dict(DETACH=detach, **pads, DIN_PAD=rt._padded(in_dim)), rt.FINAL_NUM_WARPS)
    # The backward reduction touches compute-dtype buffers only.
    for dtype in (torch.float32, torch.float64):
        for prologue in (False, True):
            yield ("backward_reduce", rt._backward_reduce_kernel, dtype,
                   dict(PROLOGUE=prologue, BLOCK_B=rt.REDUCE_CONFIG.block_b, **pads),
                   rt.REDUCE_CONFIG.num_warps)


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


def compile_all(archs: Sequence[int] = ARCHS, out_caps: int = MNIST["out_caps"], out_dim: int = MNIST["out_dim"],
                in_dim: int = MNIST["in_dim"]) -> List[Compiled]:
    """Compile every launch configuration for every arch; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _routing_triton as rt

    if rt.INTERPRETED:
        raise RuntimeError("fastcaps.triton_aot: TRITON_INTERPRET=1 is set; the interpreter's kernels "
                           "cannot be compiled. Run without it.")
    results = []
    for arch in archs:
        for name, kernel, dtype, constexprs, num_warps in launch_configurations(out_caps, out_dim, in_dim):
            source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": num_warps, "enable_fp_fusion": True})
            except Exception as error:
                raise RuntimeError(f"{name} {constexprs} {dtype} failed to compile for sm_{arch}: {error}") from error
            usage = _resources(compiled.asm["cubin"])
            options = " ".join(f"{key}={value}" for key, value in constexprs.items())
            results.append(Compiled(name, arch, _TRITON_TYPE[dtype], options, num_warps, usage["REG"],
                                    compiled.metadata.shared, usage.get("LOCAL", 0) + usage.get("STACK", 0)))
    return results


def format_table(results: Sequence[Compiled]) -> str:
    from .check import format_table

    header = ("kernel", "sm", "dtype", "options", "warps", "regs", "shared B", "spill B")
    return format_table([(r.kernel, r.arch, r.dtype, r.options, r.num_warps, r.registers, r.shared_bytes,
                          r.spill_bytes) for r in results], header)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcaps.triton_aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--out-caps", type=int, default=MNIST["out_caps"])
    parser.add_argument("--out-dim", type=int, default=MNIST["out_dim"])
    parser.add_argument("--in-dim", type=int, default=MNIST["in_dim"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.out_caps, args.out_dim, args.in_dim)
    print(format_table(results))
    spilled = [r for r in results if r.spill_bytes]
    print(f"\n{len(results)} kernels compiled; {len(spilled)} spill to local memory")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
