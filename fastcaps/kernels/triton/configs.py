"""Launch configuration of the Triton dynamic-routing kernels: a table keyed on shapes only, so
that for a given shape and device the partition, and so every bit of the result, is fixed.

``Launch`` is one kernel with its compile-time arguments and warps. The launchers
(fastcaps/kernels/triton/dynamic_routing.py) build every launch through the functions here,
and ``launch_configurations`` lists every launch they can make at some capsule dimensions:
the ahead-of-time compile (``python -m fastcaps.tools.aot``) compiles exactly those.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from ...cases import RoutingShape
from . import routing_jit as jit


class PassConfig(NamedTuple):
    block_b: int  # samples per program
    num_warps: int


# Every configuration a pass can launch with; tests compile each ahead of time.
PASS_CONFIGS = (PassConfig(1, 4), PassConfig(2, 4), PassConfig(4, 4), PassConfig(8, 4), PassConfig(16, 8))
# 8 warps: with 4, the float64 reductions' tiles of 16 chunks spilled 8-16 bytes (Triton 3.6).
REDUCE_CONFIG = PassConfig(1, 8)
# Chunk partials a reduction program loads and sums at once (routing_jit._sum_partials).
REDUCE_CHUNK_TILE = 16
# Phase B's configurations: one sample at a time (below 16 samples; float64 on 8 warps), or
# 16 per step on tl.dot (16 warps). Warps chosen by the ahead-of-time compile (python -m
# fastcaps.tools.aot) on Triton 3.9 and 3.6: the fewest with no spill at the MNIST dimensions
# and (3, 5, 3), (1, 1, 1) on sm_80 and sm_90 (8 warps for one float32 sample put 16 bytes on
# the stack on sm_80, 4 for float64 8; 8 warps for the tl.dot step reached 255 registers and
# spilled 8 bytes on sm_80 with Triton 3.6). The batch is split into at most MAX_FINAL_SPLITS
# parts when the input capsules alone give too few programs.
FINAL_CONFIGS = (PassConfig(1, 4), PassConfig(1, 8), PassConfig(16, 16))
MAX_FINAL_SPLITS = 16
# Passes aim at this many programs per streaming multiprocessor, so a wave fills the GPU.
_PROGRAMS_PER_SM = 4
# The dtypes a launch takes: half inputs compute in float32, float64 in float64.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Kernel arguments that point at tensors of the input dtype; every other pointer is in the
# compute dtype (float32 for half inputs).
INPUT_DTYPE_POINTERS = frozenset({"u_ptr", "w_ptr", "bias_ptr", "v_ptr", "grad_u_ptr", "grad_w_ptr"})


def pass_config(batch: int, dtype: torch.dtype) -> PassConfig:
    """The largest sample block that the batch fills (16 needs 16 samples: tl.dot's minimum).
    float64 takes one sample per program: larger blocks spill registers at the MNIST shape
    (python -m fastcaps.tools.aot)."""
    if dtype == torch.float64:
        return PASS_CONFIGS[0]
    for config in reversed(PASS_CONFIGS):
        if batch >= config.block_b:
            return config
    return PASS_CONFIGS[0]


def _reachable(choose: Callable[[int, torch.dtype], PassConfig], candidates: Sequence[PassConfig],
               dtype: torch.dtype) -> List[PassConfig]:
    """The candidates that ``choose(batch, dtype)`` picks for some batch, in their order."""
    largest = max(config.block_b for config in candidates)
    reachable = {choose(batch, dtype) for batch in range(1, 2 * largest + 1)}
    return [config for config in candidates if config in reachable]


def reachable_pass_configs(dtype: torch.dtype) -> List[PassConfig]:
    """The pass configurations some batch takes in ``dtype`` (float64: one)."""
    return _reachable(pass_config, PASS_CONFIGS, dtype)


def capsule_chunks(batch: int, in_caps: int, block_b: int, processors: int) -> Tuple[int, int]:
    """(capsules per chunk, chunks): enough (sample block, chunk) programs to fill
    ``processors`` multiprocessors, and no more chunks than capsules."""
    blocks = triton.cdiv(batch, block_b)
    wanted = max(1, triton.cdiv(processors * _PROGRAMS_PER_SM, blocks))
    per_chunk = max(1, triton.cdiv(in_caps, wanted))
    return per_chunk, max(1, triton.cdiv(in_caps, per_chunk))


# CUDA takes at most 2^31 - 1 programs on a grid's first axis and 65535 on the others. A
# launch covers at most this many samples (or, in the final kernel, input capsules), which
# also keeps the kernels' 32-bit products program id x BLOCK_B below 2^31; larger batches
# and capsule counts are split into several launches, each computing exactly what one
# launch would (the samples are independent, and so are the final kernel's capsules).
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_Y = 65535
MAX_LAUNCH_ROWS = 2 ** 30


def launch_ranges(count: int, step: int = 1) -> List[Tuple[int, int]]:
    """[start, stop) ranges of at most MAX_LAUNCH_ROWS that cover range(count) in order, each
    starting at a multiple of ``step`` (a pass's sample block).

    A split launch must not move a sample to another row of its program's tile: a tile's
    row results may depend on the row's position. Under the interpreter tl.dot is numpy's
    matmul, and OpenBLAS's Haswell sgemm kernel (AVX2 machines) sums rows 0-5, 6-11 and
    12-15 of a 16-row tile in different orders (different last bits); its AVX-512 kernel
    does not, so only AVX2 machines showed it. Starting every launch on a block boundary
    keeps each sample in the row it has in one launch."""
    rows = max(step, MAX_LAUNCH_ROWS // step * step)
    return [(start, min(count, start + rows)) for start in range(0, count, rows)]


class PassPlan(NamedTuple):
    config: PassConfig
    chunks: int
    per_chunk: int  # capsules per chunk

    def grid(self, rows: int) -> Tuple[int, int]:
        """(sample blocks, chunks) for a launch over ``rows`` samples."""
        return triton.cdiv(rows, self.config.block_b), self.chunks


def pass_plan(batch: int, in_caps: int, dtype: torch.dtype, processors: int) -> PassPlan:
    """The passes' configuration and capsule chunks, chosen from the whole batch: a batch split
    over several launches uses the same ones, so each sample gets the same bits."""
    config = pass_config(batch, dtype)
    per_chunk, chunks = capsule_chunks(batch, in_caps, config.block_b, processors)
    return PassPlan(config, chunks, per_chunk)


def processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: a few chunks, so the partial sums are exercised.
    return 1


def padded(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def uses_dot(config: PassConfig, dtype: torch.dtype, out_caps: int, out_dim: int) -> bool:
    # tl.dot takes blocks of at least 16 in every dimension (Din is padded up to 16);
    # float64 stays on the multiply-add path.
    columns = padded(out_caps) * padded(out_dim)
    return config.block_b >= 16 and columns >= 16 and dtype != torch.float64


# Compile options of every launch, the same in the launchers and the ahead-of-time compile
# (tools/aot.py), so that the report describes the programs that run. FP fusion (a * b + c as
# one FMA) is set, not left to Triton's default, which Triton has said it may change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
# Phase B's kernel also says the architecture's register limit: without it ptxas held some
# of its programs to 64 or 96 registers and put 8-24 bytes on the stack ((J, D, Din) =
# (3, 5, 3), tl.dot, sm_80 and sm_90: python -m fastcaps.tools.aot). Not set for the other
# kernels, where it raised the registers of the passes (92 to 124 for one sample) and fixed
# nothing.
FINAL_OPTIONS = {"maxnreg": 255}


# How a float32 u_hat is formed on tl.dot: "ieee" (the default: CUDA cores, float32 exactly)
# or "tf32x3" (tensor cores, three TF32 products per product, close to float32: off until a
# GPU has measured its error against the checks' 1e-4), in the routing passes. Read from the
# environment at each launch; half inputs and phase B always take "ieee".
FLOAT32_DOT_VARIABLE = "FASTCAPS_TRITON_FLOAT32_DOT"
FLOAT32_DOT_PRECISIONS = ("ieee", "tf32x3")


def float32_dot_precision() -> str:
    value = os.environ.get(FLOAT32_DOT_VARIABLE, "") or "ieee"
    if value not in FLOAT32_DOT_PRECISIONS:
        raise ValueError(f"{FLOAT32_DOT_VARIABLE}={value!r}: expected one of {', '.join(FLOAT32_DOT_PRECISIONS)}")
    return value


def _dot_precision(dtype: torch.dtype, use_dot: bool, precision: Optional[str]) -> str:
    if not use_dot or dtype != torch.float32:
        return "ieee"
    return precision or float32_dot_precision()


class Launch(NamedTuple):
    name: str
    kernel: object  # a @triton.jit function of routing_jit
    constexprs: Dict[str, object]
    num_warps: int
    options: Optional[Dict[str, object]] = None  # compile options beside COMPILE_OPTIONS

    @property
    def compile_options(self) -> Dict[str, object]:
        return {"num_warps": self.num_warps, **COMPILE_OPTIONS, **(self.options or {})}


def pass_launch(config: PassConfig, dtype: torch.dtype, shape: RoutingShape, backward: bool,
                precision: Optional[str] = None) -> Launch:
    """A routing pass (forward: sums c u_hat; backward, phase A: sums delta u_hat). precision:
    the float32 tl.dot's (default: float32_dot_precision())."""
    use_dot = uses_dot(config, dtype, shape.out_caps, shape.out_dim)
    return Launch("routing_pass", jit._routing_pass_kernel,
                  dict(BACKWARD=backward, BLOCK_B=config.block_b, J_PAD=padded(shape.out_caps),
                       D_PAD=padded(shape.out_dim), DIN_PAD=padded(shape.in_dim, 16 if use_dot else 1),
                       USE_DOT=use_dot, DOT_PRECISION=_dot_precision(dtype, use_dot, precision)), config.num_warps)


def forward_reduce_launch(shape: RoutingShape, has_bias: bool) -> Launch:
    return Launch("forward_reduce", jit._forward_reduce_kernel,
                  dict(HAS_BIAS=has_bias, **_reduce_blocks(shape)), REDUCE_CONFIG.num_warps)


def backward_reduce_launch(shape: RoutingShape, prologue: bool) -> Launch:
    return Launch("backward_reduce", jit._backward_reduce_kernel,
                  dict(PROLOGUE=prologue, **_reduce_blocks(shape)), REDUCE_CONFIG.num_warps)


def final_config(batch: int, dtype: torch.dtype) -> PassConfig:
    """16 samples per step, the three products of phase B on tl.dot, once the batch has 16
    (tl.dot's smallest tile; not float64); else one sample at a time."""
    if dtype == torch.float64:
        return FINAL_CONFIGS[1]
    return FINAL_CONFIGS[2] if batch >= FINAL_CONFIGS[2].block_b else FINAL_CONFIGS[0]


class FinalPlan(NamedTuple):
    config: PassConfig
    splits: int  # parts of the batch, each a program per input capsule (grid axis 1)
    samples_per_split: int  # a multiple of config.block_b


def final_plan(batch: int, in_caps: int, dtype: torch.dtype, processors: int) -> FinalPlan:
    """Phase B's configuration, and the batch split into whole blocks of samples when the
    input capsules alone give fewer than _PROGRAMS_PER_SM programs per multiprocessor (each
    split's grad W is then a partial, added by the launcher): at most MAX_FINAL_SPLITS, and
    never more than there are blocks."""
    config = final_config(batch, dtype)
    blocks = max(1, triton.cdiv(batch, config.block_b))
    wanted = triton.cdiv(processors * _PROGRAMS_PER_SM, max(in_caps, 1))
    splits = max(1, min(blocks, wanted, MAX_FINAL_SPLITS))
    per_split = triton.cdiv(blocks, splits) * config.block_b
    return FinalPlan(config, max(1, triton.cdiv(batch, per_split)), per_split)


def final_launch(shape: RoutingShape, detach_routing: bool, config: PassConfig, dtype: torch.dtype) -> Launch:
    """Phase B; its products stay in IEEE float32 whatever float32_dot_precision() says (its
    tf32x3 program spilled 8-32 bytes and took 66 KB of shared memory, sm_80 and sm_90)."""
    use_dot = uses_dot(config, dtype, shape.out_caps, shape.out_dim)
    return Launch("routing_final", jit._routing_final_kernel,
                  dict(DETACH_ROUTING=detach_routing, BLOCK_B=config.block_b, J_PAD=padded(shape.out_caps),
                       D_PAD=padded(shape.out_dim), DIN_PAD=padded(shape.in_dim, 16 if use_dot else 1),
                       USE_DOT=use_dot, DOT_PRECISION="ieee"), config.num_warps, FINAL_OPTIONS)


def reachable_final_configs(dtype: torch.dtype) -> List[PassConfig]:
    """Phase B's configurations some batch takes in ``dtype``."""
    return _reachable(final_config, FINAL_CONFIGS, dtype)


def _reduce_blocks(shape: RoutingShape) -> Dict[str, int]:
    return dict(BLOCK_B=REDUCE_CONFIG.block_b, J_PAD=padded(shape.out_caps), D_PAD=padded(shape.out_dim),
                CHUNK_TILE=REDUCE_CHUNK_TILE)


def reduce_grid(batch: int) -> Tuple[int]:
    return (triton.cdiv(batch, REDUCE_CONFIG.block_b),)


def launch_configurations(shape: RoutingShape) -> Iterator[Tuple[torch.dtype, Launch]]:
    """(input dtype, launch) for every launch the launchers can make at these capsule
    dimensions (any batch, any number of input capsules; shape.batch is not read), with
    both float32 tl.dot precisions. The backward reduction touches compute-dtype buffers
    only, so it is listed for float32 and float64 alone."""
    for dtype in DTYPES:
        for config in reachable_pass_configs(dtype):
            for backward in (False, True):
                yield dtype, pass_launch(config, dtype, shape, backward, "ieee")
                if dtype == torch.float32 and uses_dot(config, dtype, shape.out_caps, shape.out_dim):
                    yield dtype, pass_launch(config, dtype, shape, backward, "tf32x3")
        for has_bias in (False, True):
            yield dtype, forward_reduce_launch(shape, has_bias)
        for config in reachable_final_configs(dtype):
            for detach_routing in (False, True):
                yield dtype, final_launch(shape, detach_routing, config, dtype)
    for dtype in (torch.float32, torch.float64):
        for prologue in (False, True):
            yield dtype, backward_reduce_launch(shape, prologue)
