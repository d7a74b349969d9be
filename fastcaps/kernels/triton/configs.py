"""Launch configuration of the Triton dynamic-routing kernels: a table keyed on shapes only, so
that for a given shape and device the partition, and so every bit of the result, is fixed.

``Launch`` is one kernel with its compile-time arguments and warps. The launchers
(fastcaps/kernels/triton/dynamic_routing.py) build every launch through the functions here,
and ``launch_configurations`` lists every launch they can make at some capsule dimensions:
the ahead-of-time compile (``python -m fastcaps.tools.aot``) compiles exactly those.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton

from ...cases import RoutingShape
from . import routing_jit as jit


class PassConfig(NamedTuple):
    block_b: int  # samples per program
    num_warps: int


# The sample blocks a pass can take (16: tl.dot's smallest tile); each shape takes those whose
# tiles fit in registers (pass_configs).
PASS_BLOCKS = (1, 2, 4, 8, 16)
# 8 warps: with 4, the float64 reductions' tiles of 16 chunks spilled 8-16 bytes (Triton 3.6).
REDUCE_CONFIG = PassConfig(1, 8)
# Chunk partials a reduction program loads and sums at once (routing_jit._sum_partials): 16,
# or fewer where 16 chunks of J x D would pass REDUCE_TILE_VALUES (reduce_chunk_tile): at
# (32, 32, 16) the float64 reductions' 16 chunks spilled 24-128 bytes (Triton 3.6).
REDUCE_CHUNK_TILE = 16
REDUCE_TILE_VALUES = 8192
# Phase B's sample blocks: one sample at a time, or 16 per step (on tl.dot where the tiles
# allow). The batch is split into at most MAX_FINAL_SPLITS parts when the input capsules alone
# give too few programs.
FINAL_BLOCKS = (1, 16)
MAX_FINAL_SPLITS = 16
# Passes aim at this many programs per streaming multiprocessor, so a wave fills the GPU.
_PROGRAMS_PER_SM = 4
# The dtypes a launch takes: half inputs compute in float32, float64 in float64.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Kernel arguments that point at tensors of the input dtype; every other pointer is in the
# compute dtype (float32 for half inputs).
INPUT_DTYPE_POINTERS = frozenset({"u_ptr", "w_ptr", "bias_ptr", "v_ptr", "grad_u_ptr", "grad_w_ptr", "votes_ptr",
                                  "grad_votes_ptr"})


# Register budget. A block has 65,536 registers whatever its warps (CUDA's limit per block:
# 255 per thread on 8 warps, 128 on 16), so more warps add no room, and a program on 16 warps
# that ptxas let take more than 128 registers cannot launch at all (fastcaps.tools.aot checks
# it). A configuration is sized by the 4-byte values its tiles hold in registers (a float64
# counts two): per sample the routing state (u_hat, V, and the pass's sum; phase B also sigma
# and g: 3 and 4 tiles of J x D), and the W tiles (a pass: one tile of W[:, i]; phase B: W[:, i]
# and its grad W, or their Din tiles). It takes 4 warps up to 8,192 values, 8 up to 24,576,
# and does not fit beyond; 8 warps also once a J*D row passes 512 columns (more than 4 per
# thread on 4 warps). Calibrated with the ahead-of-time compile at the MNIST dimensions,
# (32, 32, 16), (3, 5, 3) and (1, 1, 1) on sm_80 and sm_90: the MNIST 8-sample pass (8,192
# values) compiled without spills on 4 warps and phase B's 16-sample tl.dot step (24,576) on
# 8; at (32, 32, 16) one sample on 4 warps spilled 24-56 bytes, on 8 none.
WARPS_BY_VALUES = ((8192, 4), (24576, 8))
FOUR_WARP_COLUMNS = 512
# The largest W tile (input features x J*D) held whole, in values. Larger capsules take W in
# tiles of fewer input features (din_tile) of at most half this, the tiles' parts of u_hat
# added in order: at (32, 32, 16) tiles of 4 features (4,096 values) still spilled 8 bytes in
# float64 on sm_80 (tile loop unrolled then), of 2 none. tl.dot takes W[:, i] whole (its K is
# 16 or more).
W_TILE_VALUES = 4096
PASS_STATE_TILES = 3
FINAL_STATE_TILES = 4


def _value_scale(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float64 else 1


def _tile_columns(shape: RoutingShape) -> int:
    return padded(shape.out_caps) * padded(shape.out_dim)


def _input_features(shape: RoutingShape, use_dot: bool) -> int:
    """Din padded for the W tile (tl.dot takes 16 or more)."""
    return padded(shape.in_dim, 16 if use_dot else 1)


def _halved_to_fit(tile: int, values_each: int, limit: int) -> int:
    """``tile`` (a power of two) halved while tile x values_each passes ``limit`` (at least 1)."""
    while tile > 1 and tile * values_each > limit:
        tile //= 2
    return tile


def din_tile(shape: RoutingShape, dtype: torch.dtype, use_dot: bool) -> int:
    """Input features per W tile: all of them (padded) when W[:, i] fits in W_TILE_VALUES or the
    product is tl.dot's, else the largest power of two within half of it (at least 1)."""
    features = _input_features(shape, use_dot)
    per_feature = _tile_columns(shape) * _value_scale(dtype)
    if use_dot or features * per_feature <= W_TILE_VALUES:
        return features
    return _halved_to_fit(features, per_feature, W_TILE_VALUES // 2)


def _warps_for(values: int, shape: RoutingShape) -> Optional[int]:
    for limit, warps in WARPS_BY_VALUES:
        if values <= limit and (warps > 4 or _tile_columns(shape) <= FOUR_WARP_COLUMNS):
            return warps
    return None


def _pass_fit(block_b: int, shape: RoutingShape, dtype: torch.dtype) -> Optional[PassConfig]:
    """The block's configuration, or None when its tiles do not fit."""
    columns = _tile_columns(shape)
    tile = din_tile(shape, dtype, uses_dot(block_b, dtype, shape.out_caps, shape.out_dim))
    warps = _warps_for(_value_scale(dtype) * (PASS_STATE_TILES * block_b * columns + tile * columns), shape)
    return None if warps is None else PassConfig(block_b, warps)


def _fitting(blocks: Tuple[int, ...], dtype: torch.dtype, fit) -> List[PassConfig]:
    """fit(block) for the blocks (float64: the first only) where it fits, smallest first; when
    none does (capsules too large for any block), one sample on 8 warps, and ptxas spills
    (slow, not wrong)."""
    fitting = [config for config in (fit(block) for block in (blocks[:1] if dtype == torch.float64 else blocks))
               if config]
    return fitting or [PassConfig(1, WARPS_BY_VALUES[-1][1])]


def _largest_filled(configs: List[PassConfig], batch: int) -> PassConfig:
    """The largest block that the batch fills (16 needs 16 samples), else the smallest."""
    return next((config for config in reversed(configs) if batch >= config.block_b), configs[0])


def pass_configs(shape: RoutingShape, dtype: torch.dtype) -> List[PassConfig]:
    """The pass configurations that fit at these capsule dimensions, smallest block first.
    float64 takes one sample per program: larger blocks spilled at the MNIST shape."""
    return _fitting(PASS_BLOCKS, dtype, lambda block: _pass_fit(block, shape, dtype))


def pass_config(batch: int, dtype: torch.dtype, shape: RoutingShape) -> PassConfig:
    """The largest fitting sample block that the batch fills (16 needs 16 samples)."""
    return _largest_filled(pass_configs(shape, dtype), batch)


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


def pass_plan(shape: RoutingShape, dtype: torch.dtype, processors: int, votes: bool = False) -> PassPlan:
    """The passes' configuration and capsule chunks, chosen from the whole batch (shape.batch): a
    batch split over several launches uses the same ones, so each sample gets the same bits.
    votes: routing from given votes (votes_pass_configs; shape.batch the votes' rows)."""
    if votes:
        config = _largest_filled(votes_pass_configs(shape, dtype), shape.batch)
    else:
        config = pass_config(shape.batch, dtype, shape)
    per_chunk, chunks = capsule_chunks(shape.batch, shape.in_caps, config.block_b, processors)
    return PassPlan(config, chunks, per_chunk)


def processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: a few chunks, so the partial sums are exercised.
    return 1


def padded(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def uses_dot(block_b: int, dtype: torch.dtype, out_caps: int, out_dim: int) -> bool:
    # tl.dot takes blocks of at least 16 in every dimension (Din is padded up to 16);
    # float64 stays on the multiply-add path.
    columns = padded(out_caps) * padded(out_dim)
    return block_b >= 16 and columns >= 16 and dtype != torch.float64


# Compile options of every launch, the same in the launchers and the ahead-of-time compile
# (tools/aot.py), so that the report describes the programs that run. FP fusion (a * b + c as
# one FMA) is set, not left to Triton's default, which Triton has said it may change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
# The passes and phase B also say the architecture's register limit: without it ptxas held
# some programs to 64, 96 or 128 registers and put 8-32 bytes on the stack (phase B at
# (J, D, Din) = (3, 5, 3), tl.dot; the 2-sample float16 pass at (32, 32, 16), sm_80: python -m
# fastcaps.tools.aot). On 4 and 8 warps 255 registers a thread always launch (255 x 256 <
# 65,536); no configuration takes more warps. Not set for the reductions, which need few.
REGISTER_OPTIONS = {"maxnreg": 255}


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
                precision: Optional[str] = None, votes: bool = False) -> Launch:
    """A routing pass (forward: sums c u_hat; backward, phase A: sums delta u_hat). precision:
    the float32 tl.dot's (default: float32_dot_precision()). votes: u_hat is given (route_votes,
    votes_pass_configs), nothing predicts, and the input-feature arguments are unused."""
    use_dot = not votes and uses_dot(config.block_b, dtype, shape.out_caps, shape.out_dim)
    features = 1 if votes else _input_features(shape, use_dot)
    return Launch("votes_pass" if votes else "routing_pass", jit._routing_pass_kernel,
                  dict(BACKWARD=backward, BLOCK_B=config.block_b, J_PAD=padded(shape.out_caps),
                       D_PAD=padded(shape.out_dim), DIN_PAD=features,
                       DIN_TILE=1 if votes else din_tile(shape, dtype, use_dot), USE_DOT=use_dot,
                       DOT_PRECISION=_dot_precision(dtype, use_dot, precision), VOTES=votes), config.num_warps,
                  REGISTER_OPTIONS)


# Routing from given votes: its passes and its phase B (routing_jit._votes_gradient_kernel)
# share one configuration, sized by phase B's tiles per row (no W tile): u_hat, V, sigma, g
# and the couplings' temporaries, counted as VOTES_STATE_TILES. With 4 (phase B's dense
# count) the 4-row phase B at (J, D) = (32, 16) took 255 registers on 4 warps and spilled 8
# bytes (Triton 3.6, sm_90); with 6 it takes 8 warps. A block of rows shares no load (each
# row has its own votes): it only makes a program's tiles larger, so the block is the
# largest that fits and that the rows fill.
VOTES_STATE_TILES = 6


def _votes_fit(block: int, shape: RoutingShape, dtype: torch.dtype) -> Optional[PassConfig]:
    warps = _warps_for(_value_scale(dtype) * VOTES_STATE_TILES * block * _tile_columns(shape), shape)
    return None if warps is None else PassConfig(block, warps)


def votes_pass_configs(shape: RoutingShape, dtype: torch.dtype) -> List[PassConfig]:
    """The votes launches' configurations that fit, smallest block first (float64: one row)."""
    return _fitting(PASS_BLOCKS, dtype, lambda block: _votes_fit(block, shape, dtype))


def votes_gradient_launch(shape: RoutingShape, detach_routing: bool, config: PassConfig) -> Launch:
    return Launch("votes_gradient", jit._votes_gradient_kernel,
                  dict(DETACH_ROUTING=detach_routing, BLOCK_B=config.block_b, J_PAD=padded(shape.out_caps),
                       D_PAD=padded(shape.out_dim)), config.num_warps, REGISTER_OPTIONS)


def forward_reduce_launch(shape: RoutingShape, has_bias: bool, dtype: torch.dtype) -> Launch:
    return Launch("forward_reduce", jit._forward_reduce_kernel,
                  dict(HAS_BIAS=has_bias, **_reduce_blocks(shape, dtype)), REDUCE_CONFIG.num_warps)


def backward_reduce_launch(shape: RoutingShape, prologue: bool, dtype: torch.dtype) -> Launch:
    return Launch("backward_reduce", jit._backward_reduce_kernel,
                  dict(PROLOGUE=prologue, **_reduce_blocks(shape, dtype)), REDUCE_CONFIG.num_warps)


def reduce_chunk_tile(shape: RoutingShape, dtype: torch.dtype) -> int:
    """Chunks per reduction step: REDUCE_CHUNK_TILE, halved while the tile of J x D partials
    passes REDUCE_TILE_VALUES (at least 1)."""
    return _halved_to_fit(REDUCE_CHUNK_TILE, _tile_columns(shape) * _value_scale(dtype), REDUCE_TILE_VALUES)


def w_resident(shape: RoutingShape, dtype: torch.dtype, block_b: int) -> bool:
    """Whether phase B holds W[:, i] and its grad W in registers across its batch loop (else it
    streams both in Din tiles, routing_jit._routing_final_kernel)."""
    use_dot = uses_dot(block_b, dtype, shape.out_caps, shape.out_dim)
    return din_tile(shape, dtype, use_dot) == _input_features(shape, use_dot) and \
        _final_warps(shape, dtype, block_b, resident=True) is not None


def _final_warps(shape: RoutingShape, dtype: torch.dtype, block_b: int, resident: bool) -> Optional[int]:
    columns = _tile_columns(shape)
    use_dot = uses_dot(block_b, dtype, shape.out_caps, shape.out_dim)
    features = _input_features(shape, use_dot) if resident else din_tile(shape, dtype, use_dot)
    return _warps_for(_value_scale(dtype) * (FINAL_STATE_TILES * block_b * columns + 2 * features * columns),
                      shape)


def _final_fit(block_b: int, shape: RoutingShape, dtype: torch.dtype) -> Optional[PassConfig]:
    resident = w_resident(shape, dtype, block_b)
    if not resident and uses_dot(block_b, dtype, shape.out_caps, shape.out_dim):
        return None  # phase B streams W for the multiply-add path only
    warps = _final_warps(shape, dtype, block_b, resident)
    return None if warps is None else PassConfig(block_b, warps)


def final_configs(shape: RoutingShape, dtype: torch.dtype) -> List[PassConfig]:
    """Phase B's configurations that fit at these capsule dimensions, smallest block first
    (float64: one sample at a time)."""
    return _fitting(FINAL_BLOCKS, dtype, lambda block: _final_fit(block, shape, dtype))


def final_config(batch: int, dtype: torch.dtype, shape: RoutingShape) -> PassConfig:
    """16 samples per step (the three products on tl.dot where they are 16 wide or more) once
    the batch has 16 and the tiles fit; else one sample at a time."""
    return _largest_filled(final_configs(shape, dtype), batch)


class FinalPlan(NamedTuple):
    config: PassConfig
    splits: int  # parts of the batch, each a program per input capsule (grid axis 1)
    samples_per_split: int  # a multiple of config.block_b
    w_resident: bool  # W and grad W in registers; else streamed, grad W summed in an acc buffer


def final_plan(shape: RoutingShape, dtype: torch.dtype, processors: int) -> FinalPlan:
    """Phase B's configuration, and the batch (shape.batch) split into whole blocks of samples
    when the input capsules alone give fewer than _PROGRAMS_PER_SM programs per multiprocessor
    (each split's grad W is then a partial, added by the launcher): at most MAX_FINAL_SPLITS,
    and never more than there are blocks."""
    config = final_config(shape.batch, dtype, shape)
    blocks = max(1, triton.cdiv(shape.batch, config.block_b))
    wanted = triton.cdiv(processors * _PROGRAMS_PER_SM, max(shape.in_caps, 1))
    splits = max(1, min(blocks, wanted, MAX_FINAL_SPLITS))
    per_split = triton.cdiv(blocks, splits) * config.block_b
    return FinalPlan(config, max(1, triton.cdiv(shape.batch, per_split)), per_split,
                     w_resident(shape, dtype, config.block_b))


def final_launch(shape: RoutingShape, detach_routing: bool, config: PassConfig, dtype: torch.dtype) -> Launch:
    """Phase B; its products stay in IEEE float32 whatever float32_dot_precision() says (its
    tf32x3 program spilled 8-32 bytes and took 66 KB of shared memory, sm_80 and sm_90).
    DIN_TILE == DIN_PAD when W is resident (w_resident)."""
    use_dot = uses_dot(config.block_b, dtype, shape.out_caps, shape.out_dim)
    features = _input_features(shape, use_dot)
    tile = features if w_resident(shape, dtype, config.block_b) else din_tile(shape, dtype, use_dot)
    return Launch("routing_final", jit._routing_final_kernel,
                  dict(DETACH_ROUTING=detach_routing, BLOCK_B=config.block_b, J_PAD=padded(shape.out_caps),
                       D_PAD=padded(shape.out_dim), DIN_PAD=features, DIN_TILE=tile,
                       USE_DOT=use_dot, DOT_PRECISION="ieee"), config.num_warps, REGISTER_OPTIONS)


def _reduce_blocks(shape: RoutingShape, dtype: torch.dtype) -> Dict[str, int]:
    return dict(BLOCK_B=REDUCE_CONFIG.block_b, J_PAD=padded(shape.out_caps), D_PAD=padded(shape.out_dim),
                CHUNK_TILE=reduce_chunk_tile(shape, dtype))


def reduce_grid(batch: int) -> Tuple[int]:
    return (triton.cdiv(batch, REDUCE_CONFIG.block_b),)


def launch_configurations(shape: RoutingShape) -> Iterator[Tuple[torch.dtype, Launch]]:
    """(input dtype, launch) for every launch the launchers can make at these capsule
    dimensions (any batch, any number of input capsules; shape.batch is not read), route_votes'
    included, with
    both float32 tl.dot precisions. The backward reduction touches compute-dtype buffers
    only, so it is listed for float32 and float64 alone."""
    for dtype in DTYPES:
        for config in pass_configs(shape, dtype):
            for backward in (False, True):
                yield dtype, pass_launch(config, dtype, shape, backward, "ieee")
                if dtype == torch.float32 and uses_dot(config.block_b, dtype, shape.out_caps, shape.out_dim):
                    yield dtype, pass_launch(config, dtype, shape, backward, "tf32x3")
        for has_bias in (False, True):
            yield dtype, forward_reduce_launch(shape, has_bias, dtype)
        for config in final_configs(shape, dtype):
            for detach_routing in (False, True):
                yield dtype, final_launch(shape, detach_routing, config, dtype)
    for dtype in (torch.float32, torch.float64):
        for prologue in (False, True):
            yield dtype, backward_reduce_launch(shape, prologue, dtype)
    # Routing from given votes (J and D as here): its passes and phase B; its reductions are
    # the ones above.
    for dtype in DTYPES:
        for config in votes_pass_configs(shape, dtype):
            for backward in (False, True):
                yield dtype, pass_launch(config, dtype, shape, backward, votes=True)
            for detach_routing in (False, True):
                yield dtype, votes_gradient_launch(shape, detach_routing, config)
