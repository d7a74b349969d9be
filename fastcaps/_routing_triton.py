"""Fused Triton kernels for the routing op, the "triton" backend (DESIGN.md sections 2-3).

u_hat is never written to memory: every pass forms it for one input capsule at a time, in
registers, from W[:, i] and u[:, i], for a block of samples. With 16 or more samples in a
block the prediction is a matrix product, (samples x Din) @ (Din x J*D), for ``tl.dot``,
and each W tile is loaded once for the block; smaller blocks multiply and sum in
registers. The routing state of a sample is V (J x D), the sum of the v's so far.

Layouts (all contiguous; "acc" is the compute dtype: float32, or float64 for float64):
    u        (B, I, Din)      input dtype
    weight   (J, I, D, Din)   input dtype, the DigitCaps layout
    s        (B, r, J, D)     acc, each iteration's pre-squash sum (saved for the backward)
    partial  (B, chunks, J, D) acc, one pass's sum over each chunk of input capsules
    routed   forward: (B, J, D), V_t so far; backward: (B, r, J, D), V_{t-1} per iteration
    sigma    (B, r, J, D)     acc, dL/ds_t

Launches. A pass splits the input capsules into chunks, one program per (sample block,
chunk), and writes per-chunk partial sums; a small reduction kernel adds the partials in
chunk order. That is deterministic (no atomics) and fills the GPU at batch 1. Forward: per
iteration a pass and a reduction (2r launches). Backward: a prologue (V_{t-1} for every t
and sigma_r), then per iteration r..2 a pass and a reduction giving the next sigma
(DESIGN.md section 3, phase A), then one final kernel, one program per input capsule,
that walks the batch in order and writes grad u and that capsule's grad W (2r launches;
2 with detach). grad bias is the sum of sigma over samples and iterations.

Under TRITON_INTERPRET=1 (set before triton is imported) the same kernels run on CPU
tensors, which is how CI checks them. The interpreter has no bfloat16: there bfloat16
inputs are widened to float32 before the launch, which computes the same products (a
bfloat16 product is exact in float32) that the GPU's bfloat16 path accumulates in float32.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._validation import compute_dtype



# ---------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)


@triton.jit
def _norm_and_scale(s):
    """n = |s| and a = n / (1 + n^2) over the last axis of a 3-D s, kept as an axis of 1.

    Same forms as fastcaps/_squash.py: |s| is taken on s / max|s_k|, so its squares neither
    overflow nor underflow, and a = 1 / (n + 1/n) is 0 at n = inf (and set to 0 at n = 0)."""
    largest = tl.max(tl.abs(s), axis=2, keep_dims=True)
    scaled = s / tl.where(largest > 0, largest, 1.0)
    norm = largest * tl.sqrt(tl.sum(scaled * scaled, axis=2, keep_dims=True))
    positive = norm > 0
    return norm, tl.where(positive, 1.0 / (norm + 1.0 / tl.where(positive, norm, 1.0)), 0.0)


@triton.jit
def _squash(s):
    _, scale = _norm_and_scale(s)
    return s * scale


@triton.jit
def _squash_backward(s, grad):
    """J(s) grad, the squash Jacobian (symmetric) applied to dL/dv; 0 at s = 0."""
    norm, scale = _norm_and_scale(s)
    positive = norm > 0
    unit = tl.where(positive, s / tl.where(positive, norm, 1.0), 0.0)
    radial = 2.0 / (1.0 + norm * norm) - 1.0
    along = tl.sum(unit * grad, axis=2, keep_dims=True)
    return scale * (grad + radial * along * unit)


@triton.jit
def _state_tile(first_row, batch, out_caps, out_dim, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr,
                D_PAD: tl.constexpr):
    """Rows (int64, BLOCK_B x 1 x 1), offsets j*D + d (1 x J_PAD x D_PAD) and the mask of a
    (BLOCK_B, J_PAD, D_PAD) tile of per-sample routing state."""
    rows = (first_row + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None, None]
    caps = tl.arange(0, J_PAD)[None, :, None]
    dims = tl.arange(0, D_PAD)[None, None, :]
    mask = (rows < batch) & (caps < out_caps) & (dims < out_dim)
    return rows, caps * out_dim + dims, mask


@triton.jit
def _predict(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim,
             BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
             DIN_PAD: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    """u_hat[b, j, d] = sum_e W[j, capsule, d, e] u[b, capsule, e] for a block of samples,
    as (BLOCK_B, J_PAD, D_PAD) in ACC; zero in padded rows, capsules and dims."""
    capsule = tl.cast(capsule, tl.int64)
    # u tile (BLOCK_B, DIN_PAD)
    sample = tl.reshape(rows, (BLOCK_B, 1))
    feature = tl.arange(0, DIN_PAD)[None, :]
    u_tile = tl.load(u_ptr + (sample * in_caps + capsule) * in_dim + feature,
                     mask=(sample < batch) & (feature < in_dim), other=0.0)
    # W tile (DIN_PAD, J_PAD * D_PAD): column j * D_PAD + d holds W[j, capsule, d, :]
    column = tl.arange(0, J_PAD * D_PAD)[None, :]
    out_cap = (column // D_PAD).to(tl.int64)  # J * I can pass 2^31
    out_d = column % D_PAD
    in_e = tl.arange(0, DIN_PAD)[:, None]
    w_tile = tl.load(w_ptr + ((out_cap * in_caps + capsule) * out_dim + out_d) * in_dim + in_e,
                     mask=(out_cap < out_caps) & (out_d < out_dim) & (in_e < in_dim), other=0.0)
    if USE_DOT:
        # float32 in IEEE precision (TF32 would miss the 1e-4 the checks hold it to);
        # half inputs go to the tensor cores as they are: their products are exact in float32.
        flat = tl.dot(u_tile, w_tile, out_dtype=tl.float32, input_precision="ieee").to(ACC)
    else:
        flat = tl.sum(u_tile.to(ACC)[:, :, None] * w_tile.to(ACC)[None, :, :], axis=1)
    return tl.reshape(flat, (BLOCK_B, J_PAD, D_PAD))


@triton.jit
def _couplings(u_hat, routed, caps_valid):
    """c[b, j] = softmax_j(u_hat[b, j] . V[b, j]) over the real output capsules; exactly
    1/J when V = 0 (the first iteration)."""
    logits = tl.sum(u_hat * routed, axis=2)
    logits = tl.where(caps_valid, logits, float("-inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1, keep_dims=True))
    return exps / tl.sum(exps, axis=1, keep_dims=True)


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _routing_pass_kernel(
    u_ptr,  # (B, I, Din)
    w_ptr,  # (J, I, D, Din)
    routed_ptr,  # V_{t-1}: sample b at routed_ptr + b * routed_stride, (J, D)
    sigma_ptr,  # backward: dL/ds_t, sample b at sigma_ptr + b * sigma_stride, (J, D)
    partial_ptr,  # (B, chunks, J, D): this program writes [rows, chunk]
    batch, in_caps, out_caps, out_dim, in_dim,
    routed_stride, sigma_stride, routed_rows, caps_per_chunk, chunks,
    BACKWARD: tl.constexpr,  # False: sums c * u_hat (s_t); True: delta * u_hat (dL/dV_{t-1})
    BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr, DIN_PAD: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """One routing pass over a chunk of input capsules for a block of samples."""
    ACC = partial_ptr.dtype.element_ty
    block = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, state_offsets, state_mask = _state_tile(block * BLOCK_B, batch, out_caps, out_dim,
                                                  BLOCK_B, J_PAD, D_PAD)
    # routed_rows is 0 in the first iteration, where V_0 = 0 and routed_ptr holds nothing yet.
    routed = tl.load(routed_ptr + rows * routed_stride + state_offsets,
                     mask=state_mask & (rows < routed_rows), other=0.0)
    if BACKWARD:
        sigma = tl.load(sigma_ptr + rows * sigma_stride + state_offsets, mask=state_mask, other=0.0)
    caps_valid = (tl.arange(0, J_PAD) < out_caps)[None, :]
    total = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
    first = chunk.to(tl.int64) * caps_per_chunk  # past 2^31 when in_caps is
    last = tl.minimum(first + caps_per_chunk, in_caps)
    for capsule in range(first, last):
        u_hat = _predict(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim,
                         BLOCK_B, J_PAD, D_PAD, DIN_PAD, USE_DOT, ACC)
        c = _couplings(u_hat, routed, caps_valid)
        if BACKWARD:
            gamma = tl.sum(sigma * u_hat, axis=2)  # dL/dc
            weight = c * (gamma - tl.sum(c * gamma, axis=1, keep_dims=True))  # dL/dlogits
        else:
            weight = c
        total += weight[:, :, None] * u_hat
    tl.store(partial_ptr + (rows * chunks + chunk) * (out_caps * out_dim) + state_offsets, total,
             mask=state_mask)


@triton.jit
def _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd, total):
    """total + the chunks' partial sums, added in chunk order (deterministic)."""
    for chunk in range(chunks):
        total += tl.load(partial_ptr + (rows * chunks + chunk) * jd + state_offsets, mask=state_mask,
                         other=0.0)
    return total


@triton.jit
def _forward_reduce_kernel(
    partial_ptr,  # (B, chunks, J, D)
    bias_ptr,  # (J, D), read when HAS_BIAS
    s_ptr,  # (B, r, J, D): writes [:, t]
    routed_ptr,  # (B, J, D): V_{t-1} in, V_t out
    v_ptr,  # (B, J, D) output dtype: written on the last iteration
    batch, out_caps, out_dim, iterations, t, chunks, routed_rows,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """s_t = sum of the chunk partials (+ bias); v_t = squash(s_t); V_t = V_{t-1} + v_t."""
    ACC = s_ptr.dtype.element_ty
    rows, state_offsets, state_mask = _state_tile(tl.program_id(0) * BLOCK_B, batch, out_caps,
                                                  out_dim, BLOCK_B, J_PAD, D_PAD)
    jd = out_caps * out_dim
    s = _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd,
                      tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC))
    if HAS_BIAS:
        s += tl.load(bias_ptr + state_offsets, mask=state_mask, other=0.0).to(ACC)
    tl.store(s_ptr + (rows * iterations + t) * jd + state_offsets, s, mask=state_mask)
    v = _squash(s)
    # routed_rows is 0 when t = 0: V_0 = 0, and 0 + v_1 = v_1 exactly, so the backward's
    # prologue rebuilds the same bits.
    routed = tl.load(routed_ptr + rows * jd + state_offsets, mask=state_mask & (rows < routed_rows),
                     other=0.0)
    tl.store(routed_ptr + rows * jd + state_offsets, routed + v, mask=state_mask)
    if t == iterations - 1:
        tl.store(v_ptr + rows * jd + state_offsets, v.to(v_ptr.dtype.element_ty), mask=state_mask)


@triton.jit
def _backward_reduce_kernel(
    partial_ptr,  # (B, chunks, J, D): the pass's delta * u_hat sums, dL/dV_t direct parts
    s_ptr,  # (B, r, J, D)
    grad_v_ptr,  # (B, J, D) acc, dL/dv_r
    carried_ptr,  # (B, J, D) G = sum of the direct dL/dV parts so far: read, updated
    routed_ptr,  # (B, r, J, D): the prologue writes V_{t-1} for every t
    sigma_ptr,  # (B, r, J, D): writes [:, t]
    batch, out_caps, out_dim, iterations, t, chunks,
    PROLOGUE: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """G += sum of the partials; sigma_t = J(s_t) (G + dL/dv_r if t is the last iteration).

    The prologue (no partials, G = 0) also writes V_{t-1} for every iteration, summed in the
    forward's order so the recomputed couplings are the forward's."""
    ACC = s_ptr.dtype.element_ty
    rows, state_offsets, state_mask = _state_tile(tl.program_id(0) * BLOCK_B, batch, out_caps,
                                                  out_dim, BLOCK_B, J_PAD, D_PAD)
    jd = out_caps * out_dim
    if PROLOGUE:
        routed = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
        for step in range(iterations):
            tl.store(routed_ptr + (rows * iterations + step) * jd + state_offsets, routed,
                     mask=state_mask)
            s_step = tl.load(s_ptr + (rows * iterations + step) * jd + state_offsets,
                             mask=state_mask, other=0.0)
            routed += _squash(s_step)
        carried = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
    else:
        carried = tl.load(carried_ptr + rows * jd + state_offsets, mask=state_mask, other=0.0)
        carried = _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd, carried)
    tl.store(carried_ptr + rows * jd + state_offsets, carried, mask=state_mask)
    grad = carried
    if t == iterations - 1:
        grad += tl.load(grad_v_ptr + rows * jd + state_offsets, mask=state_mask, other=0.0)
    s = tl.load(s_ptr + (rows * iterations + t) * jd + state_offsets, mask=state_mask, other=0.0)
    tl.store(sigma_ptr + (rows * iterations + t) * jd + state_offsets, _squash_backward(s, grad),
             mask=state_mask)


@triton.jit
def _routing_final_kernel(
    u_ptr,  # (B, I, Din)
    w_ptr,  # (J, I, D, Din)
    routed_ptr,  # (B, r, J, D): V_{t-1}
    sigma_ptr,  # (B, r, J, D): dL/ds_t
    grad_u_ptr,  # (B, I, Din) u's dtype
    grad_w_ptr,  # (J, I, D, Din) weight's dtype
    batch, in_caps, out_caps, out_dim, in_dim, iterations, first_differentiable, first_capsule,
    DETACH: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr, DIN_PAD: tl.constexpr,
):
    """Phase B for one input capsule i (first_capsule + the program id): for each sample in order,
    g_uhat[j] = sum_t c_t[j] sigma_t[j] + delta_t[j] V_{t-1}[j], then grad u[b, i] = sum_j
    W[j, i]^T g_uhat[j] and grad W[:, i] += g_uhat u[b, i]^T. The program owns grad W[:, i],
    so the sum over the batch needs no atomics and is taken in batch order."""
    ACC = routed_ptr.dtype.element_ty
    capsule = tl.program_id(0).to(tl.int64) + first_capsule
    cap = tl.arange(0, J_PAD).to(tl.int64)[:, None, None]  # J * I can pass 2^31
    dim = tl.arange(0, D_PAD)[None, :, None]
    feature = tl.arange(0, DIN_PAD)[None, None, :]
    w_offsets = ((cap * in_caps + capsule) * out_dim + dim) * in_dim + feature
    w_mask = (cap < out_caps) & (dim < out_dim) & (feature < in_dim)
    weight = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(ACC)  # (J_PAD, D_PAD, DIN_PAD)
    state_offsets = tl.reshape(cap * out_dim + dim, (1, J_PAD, D_PAD))
    state_mask = tl.reshape((cap < out_caps) & (dim < out_dim), (1, J_PAD, D_PAD))
    caps_valid = (tl.arange(0, J_PAD) < out_caps)[None, :]
    jd = out_caps * out_dim
    in_e = tl.arange(0, DIN_PAD)
    grad_weight = tl.zeros((J_PAD, D_PAD, DIN_PAD), ACC)
    for sample in range(batch):
        row = tl.cast(sample, tl.int64)
        u_row = tl.load(u_ptr + (row * in_caps + capsule) * in_dim + in_e, mask=in_e < in_dim,
                        other=0.0).to(ACC)
        u_hat = tl.reshape(tl.sum(weight * u_row[None, None, :], axis=2), (1, J_PAD, D_PAD))
        grad_u_hat = tl.zeros((1, J_PAD, D_PAD), ACC)
        for t in range(first_differentiable, iterations):
            offsets = (row * iterations + t) * jd + state_offsets
            routed = tl.load(routed_ptr + offsets, mask=state_mask, other=0.0)
            sigma = tl.load(sigma_ptr + offsets, mask=state_mask, other=0.0)
            c = _couplings(u_hat, routed, caps_valid)
            grad_u_hat += c[:, :, None] * sigma
            if not DETACH:
                gamma = tl.sum(sigma * u_hat, axis=2)
                delta = c * (gamma - tl.sum(c * gamma, axis=1, keep_dims=True))
                grad_u_hat += delta[:, :, None] * routed  # 0 at t = 1, where V_0 = 0
        grad_flat = tl.reshape(grad_u_hat, (J_PAD, D_PAD))
        grad_u_row = tl.sum(tl.sum(weight * grad_flat[:, :, None], axis=1), axis=0)
        tl.store(grad_u_ptr + (row * in_caps + capsule) * in_dim + in_e,
                 grad_u_row.to(grad_u_ptr.dtype.element_ty), mask=in_e < in_dim)
        grad_weight += grad_flat[:, :, None] * u_row[None, None, :]
    tl.store(grad_w_ptr + w_offsets, grad_weight.to(grad_w_ptr.dtype.element_ty), mask=w_mask)


# True when TRITON_INTERPRET=1 was set before triton decorated the kernels: they run on CPU.
INTERPRETED = isinstance(_routing_pass_kernel, InterpretedFunction)

# ---------------------------------------------------------------------------------------
# Launch configuration: a table keyed on shapes only, so that for a given shape and device
# the partition, and so every bit of the result, is fixed.


class PassConfig(NamedTuple):
    block_b: int  # samples per program
    num_warps: int


# Every configuration a pass can launch with; tests compile each ahead of time.
PASS_CONFIGS = (PassConfig(1, 4), PassConfig(2, 4), PassConfig(4, 4), PassConfig(8, 4), PassConfig(16, 8))
REDUCE_CONFIG = PassConfig(1, 2)
FINAL_NUM_WARPS = 4
# Passes aim at this many programs per streaming multiprocessor, so a wave fills the GPU.
_PROGRAMS_PER_SM = 4


def pass_config(batch: int, dtype: torch.dtype) -> PassConfig:
    """The largest sample block that the batch fills (16 needs 16 samples: tl.dot's minimum).
    float64 takes one sample per program: larger blocks spill registers at the MNIST shape
    (python -m fastcaps.triton_aot)."""
    if dtype == torch.float64:
        return PASS_CONFIGS[0]
    for config in reversed(PASS_CONFIGS):
        if batch >= config.block_b:
            return config
    return PASS_CONFIGS[0]


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


def launch_ranges(count: int) -> List[Tuple[int, int]]:
    """[start, stop) ranges of at most MAX_LAUNCH_ROWS that cover range(count) in order."""
    return [(start, min(count, start + MAX_LAUNCH_ROWS)) for start in range(0, count, MAX_LAUNCH_ROWS)]


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


def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: a few chunks, so the partial sums are exercised.
    return 1


def _uses_dot(config: PassConfig, dtype: torch.dtype, out_caps: int, out_dim: int) -> bool:
    # tl.dot takes blocks of at least 16 in every dimension (Din is padded up to 16);
    # float64 stays on the multiply-add path.
    columns = _padded(out_caps) * _padded(out_dim)
    return config.block_b >= 16 and columns >= 16 and dtype != torch.float64


def _padded(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


class _Shape(NamedTuple):
    batch: int
    in_caps: int
    out_caps: int
    out_dim: int
    in_dim: int


def _launch_pass(shape: _Shape, plan: PassPlan, u: Tensor, weight: Tensor, routed: Tensor, routed_stride: int,
                 routed_rows: int, sigma: Optional[Tensor], sigma_stride: int,
                 partial_dtype: torch.dtype, backward: bool) -> Tensor:
    """One pass over the input capsules for shape.batch samples; returns the
    (shape.batch, chunks, J, D) partials."""
    config, chunks = plan.config, plan.chunks
    use_dot = _uses_dot(config, u.dtype, shape.out_caps, shape.out_dim)
    partial = u.new_empty(shape.batch, chunks, shape.out_caps, shape.out_dim, dtype=partial_dtype)
    _routing_pass_kernel[plan.grid(shape.batch)](
        u, weight, routed, routed if sigma is None else sigma, partial,
        shape.batch, shape.in_caps, shape.out_caps, shape.out_dim, shape.in_dim,
        routed_stride, sigma_stride, routed_rows, plan.per_chunk, chunks,
        BACKWARD=backward, BLOCK_B=config.block_b, J_PAD=_padded(shape.out_caps),
        D_PAD=_padded(shape.out_dim), DIN_PAD=_padded(shape.in_dim, 16 if use_dot else 1),
        USE_DOT=use_dot, num_warps=config.num_warps,
    )
    return partial


def _prepare(u: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    if INTERPRETED and u.dtype == torch.bfloat16:
        return u.float().contiguous(), weight.float().contiguous()
    return u.contiguous(), weight.contiguous()


def _reduce_grid(batch: int):
    return (triton.cdiv(batch, REDUCE_CONFIG.block_b),)


def _reduce_options(out_caps: int, out_dim: int) -> dict:
    """Block sizes and warps of both reduction kernels."""
    return dict(BLOCK_B=REDUCE_CONFIG.block_b, J_PAD=_padded(out_caps), D_PAD=_padded(out_dim),
                num_warps=REDUCE_CONFIG.num_warps)


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach: bool
) -> Tuple[Tensor, Tensor]:
    """v (B, J, D) in u's dtype and s (B, r, J, D) in the compute dtype. ``detach`` changes
    only the backward."""
    acc = compute_dtype(u.dtype)
    batch, in_caps, in_dim = u.shape
    out_caps, _, out_dim, _ = weight.shape
    s = u.new_empty(batch, iterations, out_caps, out_dim, dtype=acc)
    v = u.new_empty(batch, out_caps, out_dim)
    if batch == 0:
        return v, s
    u_k, weight_k = _prepare(u, weight)
    bias_k = s if bias is None else bias.contiguous()
    plan = pass_plan(batch, in_caps, u_k.dtype, _processors(u.device))
    for start, stop in launch_ranges(batch):
        rows = stop - start
        shape = _Shape(rows, in_caps, out_caps, out_dim, in_dim)
        routed = u.new_empty(rows, out_caps, out_dim, dtype=acc)
        for t in range(iterations):
            # routed holds V_{t-1} for every row once t > 0; V_0 = 0 is not stored.
            routed_rows = rows if t > 0 else 0
            partial = _launch_pass(shape, plan, u_k[start:stop], weight_k, routed, out_caps * out_dim,
                                   routed_rows, None, 0, acc, backward=False)
            _forward_reduce_kernel[_reduce_grid(rows)](
                partial, bias_k, s[start:stop], routed, v[start:stop], rows, out_caps, out_dim, iterations,
                t, plan.chunks, routed_rows, HAS_BIAS=bias is not None, **_reduce_options(out_caps, out_dim),
            )
    return v, s


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, iterations: int,
    detach: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_u, grad_weight, grad_bias); grad_bias is (J, D) even without a bias."""
    acc = s.dtype
    batch, in_caps, in_dim = u.shape
    out_caps, _, out_dim, _ = weight.shape
    if batch == 0:
        return torch.empty_like(u), torch.zeros_like(weight), weight.new_zeros(out_caps, out_dim)
    u_k, weight_k = _prepare(u, weight)
    s = s.contiguous()
    grad_v_k = grad_v.to(acc).contiguous()
    jd = out_caps * out_dim
    routed = u.new_empty(batch, iterations, out_caps, out_dim, dtype=acc)
    sigma = torch.empty_like(routed)
    reduce_options = _reduce_options(out_caps, out_dim)
    # With detach only the last iteration carries gradient and c_r is a constant.
    first_differentiable = iterations - 1 if detach else 0
    plan = pass_plan(batch, in_caps, u_k.dtype, _processors(u.device))
    for start, stop in launch_ranges(batch):
        rows = stop - start
        shape = _Shape(rows, in_caps, out_caps, out_dim, in_dim)
        # This launch's samples: views into the batch's buffers.
        s_part, grad_v_part = s[start:stop], grad_v_k[start:stop]
        routed_part, sigma_part = routed[start:stop], sigma[start:stop]
        carried = u.new_empty(rows, out_caps, out_dim, dtype=acc)
        _backward_reduce_kernel[_reduce_grid(rows)](
            s_part, s_part, grad_v_part, carried, routed_part, sigma_part, rows, out_caps, out_dim, iterations,
            iterations - 1, 0, PROLOGUE=True, **reduce_options,
        )
        # Phase A: the r - 1 reverse passes, each a pass and a reduction giving the next sigma.
        for t in range(iterations - 1, first_differentiable, -1):
            partial = _launch_pass(shape, plan, u_k[start:stop], weight_k, routed_part[:, t], iterations * jd,
                                   rows, sigma_part[:, t], iterations * jd, acc, backward=True)
            _backward_reduce_kernel[_reduce_grid(rows)](
                partial, s_part, grad_v_part, carried, routed_part, sigma_part, rows, out_caps, out_dim,
                iterations, t - 1, plan.chunks, PROLOGUE=False, **reduce_options,
            )
    # Phase B. Every element is written: program i writes grad u[:, i] and grad W[:, i].
    grad_u_k, grad_weight_k = torch.empty_like(u_k), torch.empty_like(weight_k)
    for first, last in launch_ranges(in_caps):
        _routing_final_kernel[(last - first,)](
            u_k, weight_k, routed, sigma, grad_u_k, grad_weight_k,
            batch, in_caps, out_caps, out_dim, in_dim, iterations, first_differentiable, first,
            DETACH=detach, J_PAD=_padded(out_caps), D_PAD=_padded(out_dim), DIN_PAD=_padded(in_dim),
            num_warps=FINAL_NUM_WARPS,
        )
    grad_bias = sigma[:, first_differentiable:].sum(dim=(0, 1))
    return grad_u_k.to(u.dtype), grad_weight_k.to(weight.dtype), grad_bias.to(weight.dtype)
