"""The Triton kernels of dynamic routing (DESIGN.md sections 2-3), device helpers first; their
launchers are fastcaps/kernels/triton/dynamic_routing.py, which also documents the launches.

u_hat is never written to memory: every pass forms it for one input capsule at a time, in
registers, from W[:, i] and u[:, i], for a block of samples. With 16 or more samples in a
block the prediction is a matrix product, (samples x Din) @ (Din x J*D), for ``tl.dot``,
and each W tile is loaded once for the block; smaller blocks multiply and sum in
registers. The routing state of a sample is V (J x D), the sum of the v's so far (v_sum).

Routing from given votes (route_votes) runs the same passes with VOTES set: u_hat is read
from the votes instead of predicted, and its phase B is _votes_gradient_kernel.

Layouts (all contiguous; "acc" is the compute dtype: float32, or float64 for float64):
    u        (B, I, Din)      input dtype
    votes    (B, I, J, D)     input dtype, with VOTES in place of u and W (B: the votes' rows)
    weight   (J, I, D, Din)   input dtype, the DigitCaps layout
    s        (B, r, J, D)     acc, each iteration's pre-squash sum (saved for the backward)
    partial  (B, chunks, J, D) acc, one pass's sum over each chunk of input capsules
    v_sum    forward: (B, J, D), V_t so far; backward: (B, r, J, D), V_{t-1} per iteration
    sigma    (B, r, J, D)     acc, dL/ds_t
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# ---------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)


@triton.jit
def _norm_and_scale(s):
    """n = |s| and a = n / (1 + n^2) over the last axis of a 3-D s, kept as an axis of 1.

    Same forms as fastcaps/kernels/torch/squash.py: |s| is taken on s / max|s_k|, so its squares neither
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
def _u_tile(u_ptr, rows, capsule, batch, in_caps, in_dim, first_feature, BLOCK_B: tl.constexpr,
            DIN_TILE: tl.constexpr):
    """u[rows, capsule, first_feature:][:DIN_TILE] as (BLOCK_B, DIN_TILE), zero past the batch and Din."""
    sample = tl.reshape(rows, (BLOCK_B, 1))
    feature = first_feature + tl.arange(0, DIN_TILE)[None, :]
    return tl.load(u_ptr + (sample * in_caps + capsule) * in_dim + feature,
                   mask=(sample < batch) & (feature < in_dim), other=0.0)


@triton.jit
def _w_tile_offsets(capsule, in_caps, out_caps, out_dim, in_dim, first_feature, J_PAD: tl.constexpr,
                    D_PAD: tl.constexpr, DIN_TILE: tl.constexpr):
    """Offsets and mask of W[:, capsule, :, first_feature:][..., :DIN_TILE] as a
    (DIN_TILE, J_PAD * D_PAD) tile: column j * D_PAD + d holds W[j, capsule, d, e]."""
    column = tl.arange(0, J_PAD * D_PAD)[None, :]
    out_cap = (column // D_PAD).to(tl.int64)  # J * I can pass 2^31
    out_d = column % D_PAD
    in_e = first_feature + tl.arange(0, DIN_TILE)[:, None]
    offsets = ((out_cap * in_caps + capsule) * out_dim + out_d) * in_dim + in_e
    return offsets, (out_cap < out_caps) & (out_d < out_dim) & (in_e < in_dim)


@triton.jit
def _predict_from_tiles(u_tile, w_tile, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
                        USE_DOT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """u_hat = u_tile @ w_tile as (BLOCK_B, J_PAD, D_PAD) in ACC."""
    if USE_DOT:
        # float32 in IEEE precision by default (TF32 would miss the 1e-4 the checks hold it
        # to), or "tf32x3" (configs.float32_dot_precision); half inputs go to the tensor cores
        # as they are: their products are exact in float32.
        flat = tl.dot(u_tile, w_tile, out_dtype=tl.float32, input_precision=DOT_PRECISION).to(ACC)
    else:
        flat = tl.sum(u_tile.to(ACC)[:, :, None] * w_tile.to(ACC)[None, :, :], axis=1)
    return tl.reshape(flat, (BLOCK_B, J_PAD, D_PAD))


@triton.jit
def _predict_tile(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim, first_feature,
                  BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr, DIN_TILE: tl.constexpr,
                  USE_DOT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The part of u_hat from the DIN_TILE input features at first_feature."""
    u_tile = _u_tile(u_ptr, rows, capsule, batch, in_caps, in_dim, first_feature, BLOCK_B, DIN_TILE)
    w_offsets, w_mask = _w_tile_offsets(capsule, in_caps, out_caps, out_dim, in_dim, first_feature, J_PAD, D_PAD,
                                        DIN_TILE)
    w_tile = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
    return _predict_from_tiles(u_tile, w_tile, BLOCK_B, J_PAD, D_PAD, USE_DOT, ACC, DOT_PRECISION)


@triton.jit
def _predict(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim,
             BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr, DIN_PAD: tl.constexpr,
             DIN_TILE: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """u_hat[b, j, d] = sum_e W[j, capsule, d, e] u[b, capsule, e] for a block of samples,
    as (BLOCK_B, J_PAD, D_PAD) in ACC; zero in padded rows, capsules and dims. W[:, capsule]
    is loaded DIN_TILE features at a time (configs.din_tile: all of them unless the tile
    would not fit in registers), the tiles' parts added in feature order."""
    capsule = tl.cast(capsule, tl.int64)
    u_hat = _predict_tile(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim, 0,
                          BLOCK_B, J_PAD, D_PAD, DIN_TILE, USE_DOT, ACC, DOT_PRECISION)
    # A loop, not unrolled: unrolled, ptxas hoisted every tile's loads and spilled (float64,
    # (32, 32, 16), Triton 3.6).
    for first_feature in range(DIN_TILE, DIN_PAD, DIN_TILE):
        u_hat += _predict_tile(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim,
                               first_feature, BLOCK_B, J_PAD, D_PAD, DIN_TILE, USE_DOT, ACC, DOT_PRECISION)
    return u_hat


@triton.jit
def _votes_tile(votes_ptr, rows, capsule, in_caps, jd, state_offsets, state_mask, ACC: tl.constexpr):
    """votes[rows, capsule] as (BLOCK_B, J_PAD, D_PAD) in ACC: a given u_hat (route_votes)."""
    return tl.load(votes_ptr + (rows * in_caps + capsule) * jd + state_offsets, mask=state_mask, other=0.0).to(ACC)


@triton.jit
def _couplings(u_hat, v_sum, caps_valid, leaky):
    """c[b, j] = softmax_j(u_hat[b, j] . V[b, j]) over the real output capsules; exactly
    1/J when V = 0 (the first iteration). With leaky (an int, 0 or 1) a zero logit joins
    the softmax and is dropped: exp(b_j) / (1 + sum_k exp(b_k)), 1/(J+1) when V = 0."""
    logits = tl.sum(u_hat * v_sum, axis=2)
    logits = tl.where(caps_valid, logits, float("-inf"))
    largest = tl.max(logits, axis=1, keep_dims=True)
    largest = tl.where(leaky != 0, tl.maximum(largest, 0.0), largest)
    exps = tl.exp(logits - largest)
    total = tl.sum(exps, axis=1, keep_dims=True) + tl.where(leaky != 0, tl.exp(-largest), 0.0)
    return exps / total


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _routing_pass_kernel(
    u_ptr,  # (B, I, Din); with VOTES the votes (B, I, J, D)
    w_ptr,  # (J, I, D, Din); not read with VOTES
    v_sum_ptr,  # V_{t-1}: sample b at v_sum_ptr + b * v_sum_stride, (J, D)
    sigma_ptr,  # backward: dL/ds_t, sample b at sigma_ptr + b * sigma_stride, (J, D)
    partial_ptr,  # (B, chunks, J, D): this program writes [rows, chunk]
    batch, in_caps, out_caps, out_dim, in_dim,
    v_sum_stride, sigma_stride, v_sum_rows, caps_per_chunk, chunks,
    leaky,  # 1: leaky routing (_couplings), else 0
    BACKWARD: tl.constexpr,  # False: sums c * u_hat (s_t); True: delta * u_hat (dL/dV_{t-1})
    BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr, DIN_PAD: tl.constexpr,
    DIN_TILE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VOTES: tl.constexpr,  # u_hat given (route_votes): read from u_ptr, not predicted
):
    """One routing pass over a chunk of input capsules for a block of samples."""
    ACC = partial_ptr.dtype.element_ty
    block = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, state_offsets, state_mask = _state_tile(block * BLOCK_B, batch, out_caps, out_dim,
                                                  BLOCK_B, J_PAD, D_PAD)
    # v_sum_rows is 0 in the first iteration, where V_0 = 0 and v_sum_ptr holds nothing yet.
    v_sum = tl.load(v_sum_ptr + rows * v_sum_stride + state_offsets,
                     mask=state_mask & (rows < v_sum_rows), other=0.0)
    if BACKWARD:
        sigma = tl.load(sigma_ptr + rows * sigma_stride + state_offsets, mask=state_mask, other=0.0)
    caps_valid = (tl.arange(0, J_PAD) < out_caps)[None, :]
    total = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
    first = chunk.to(tl.int64) * caps_per_chunk  # past 2^31 when in_caps is
    last = tl.minimum(first + caps_per_chunk, in_caps)
    for capsule in range(first, last):
        if VOTES:
            u_hat = _votes_tile(u_ptr, rows, capsule, in_caps, out_caps * out_dim, state_offsets, state_mask, ACC)
        else:
            u_hat = _predict(u_ptr, w_ptr, rows, capsule, batch, in_caps, out_caps, out_dim, in_dim,
                             BLOCK_B, J_PAD, D_PAD, DIN_PAD, DIN_TILE, USE_DOT, ACC, DOT_PRECISION)
        c = _couplings(u_hat, v_sum, caps_valid, leaky)
        if BACKWARD:
            gamma = tl.sum(sigma * u_hat, axis=2)  # dL/dc
            weight = c * (gamma - tl.sum(c * gamma, axis=1, keep_dims=True))  # dL/dlogits
        else:
            weight = c
        total += weight[:, :, None] * u_hat
    tl.store(partial_ptr + (rows * chunks + chunk) * (out_caps * out_dim) + state_offsets, total,
             mask=state_mask)


@triton.jit
def _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd, total, CHUNK_TILE: tl.constexpr):
    """total + the chunks' partial sums: CHUNK_TILE chunks loaded at once and summed by tl.sum,
    the tiles added in chunk order (deterministic). One chunk per step made the reduction at
    B = 1 a single program of 384 dependent steps (H100/H200: 384 chunks); in tiles of 16,
    24."""
    chunk_axis = tl.arange(0, CHUNK_TILE)[:, None, None, None]
    tile_rows = tl.expand_dims(rows, 0)
    tile_offsets = tl.expand_dims(state_offsets, 0)
    tile_mask = tl.expand_dims(state_mask, 0)
    for first in range(0, chunks, CHUNK_TILE):
        chunk = first + chunk_axis
        tile = tl.load(partial_ptr + (tile_rows * chunks + chunk) * jd + tile_offsets,
                       mask=tile_mask & (chunk < chunks), other=0.0)
        total += tl.sum(tile, axis=0)
    return total


@triton.jit
def _forward_reduce_kernel(
    partial_ptr,  # (B, chunks, J, D)
    bias_ptr,  # (J, D), read when HAS_BIAS
    s_ptr,  # (B, r, J, D): writes [:, t]
    v_sum_ptr,  # (B, J, D): V_{t-1} in, V_t out
    v_ptr,  # (B, J, D) output dtype: written on the last iteration
    batch, out_caps, out_dim, iterations, t, chunks, v_sum_rows,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    """s_t = sum of the chunk partials (+ bias); v_t = squash(s_t); V_t = V_{t-1} + v_t."""
    ACC = s_ptr.dtype.element_ty
    rows, state_offsets, state_mask = _state_tile(tl.program_id(0) * BLOCK_B, batch, out_caps,
                                                  out_dim, BLOCK_B, J_PAD, D_PAD)
    jd = out_caps * out_dim
    s = _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd,
                      tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC), CHUNK_TILE)
    if HAS_BIAS:
        s += tl.load(bias_ptr + state_offsets, mask=state_mask, other=0.0).to(ACC)
    tl.store(s_ptr + (rows * iterations + t) * jd + state_offsets, s, mask=state_mask)
    v = _squash(s)
    # v_sum_rows is 0 when t = 0: V_0 = 0, and 0 + v_1 = v_1 exactly, so the backward's
    # prologue rebuilds the same bits.
    v_sum = tl.load(v_sum_ptr + rows * jd + state_offsets, mask=state_mask & (rows < v_sum_rows),
                     other=0.0)
    tl.store(v_sum_ptr + rows * jd + state_offsets, v_sum + v, mask=state_mask)
    if t == iterations - 1:
        tl.store(v_ptr + rows * jd + state_offsets, v.to(v_ptr.dtype.element_ty), mask=state_mask)


@triton.jit
def _backward_reduce_kernel(
    partial_ptr,  # (B, chunks, J, D): the pass's delta * u_hat sums, dL/dV_t direct parts
    s_ptr,  # (B, r, J, D)
    grad_v_ptr,  # (B, J, D) acc, dL/dv_r
    carried_ptr,  # (B, J, D) G = sum of the direct dL/dV parts so far: read, updated
    v_sum_ptr,  # (B, r, J, D): the prologue writes V_{t-1} for every t
    sigma_ptr,  # (B, r, J, D): writes [:, t]
    batch, out_caps, out_dim, iterations, t, chunks,
    PROLOGUE: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    """G += sum of the partials; sigma_t = J(s_t) (G + dL/dv_r if t is the last iteration).

    The prologue (no partials, G = 0) also writes V_{t-1} for every iteration, summed in the
    forward's order so the recomputed couplings are the forward's."""
    ACC = s_ptr.dtype.element_ty
    rows, state_offsets, state_mask = _state_tile(tl.program_id(0) * BLOCK_B, batch, out_caps,
                                                  out_dim, BLOCK_B, J_PAD, D_PAD)
    jd = out_caps * out_dim
    if PROLOGUE:
        v_sum = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
        for step in range(iterations):
            tl.store(v_sum_ptr + (rows * iterations + step) * jd + state_offsets, v_sum,
                     mask=state_mask)
            s_step = tl.load(s_ptr + (rows * iterations + step) * jd + state_offsets,
                             mask=state_mask, other=0.0)
            v_sum += _squash(s_step)
        carried = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
    else:
        carried = tl.load(carried_ptr + rows * jd + state_offsets, mask=state_mask, other=0.0)
        carried = _sum_partials(partial_ptr, rows, state_offsets, state_mask, chunks, jd, carried, CHUNK_TILE)
    tl.store(carried_ptr + rows * jd + state_offsets, carried, mask=state_mask)
    grad = carried
    if t == iterations - 1:
        grad += tl.load(grad_v_ptr + rows * jd + state_offsets, mask=state_mask, other=0.0)
    s = tl.load(s_ptr + (rows * iterations + t) * jd + state_offsets, mask=state_mask, other=0.0)
    tl.store(sigma_ptr + (rows * iterations + t) * jd + state_offsets, _squash_backward(s, grad),
             mask=state_mask)


@triton.jit
def _grad_u_hat(u_hat, v_sum_ptr, sigma_ptr, rows, state_offsets, state_mask, jd, iterations,
                first_differentiable, caps_valid, leaky, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr,
                D_PAD: tl.constexpr, DETACH_ROUTING: tl.constexpr, ACC: tl.constexpr):
    """g = dL/du_hat for a block of samples, (BLOCK_B, J_PAD * D_PAD):
    sum_t c_t[j] sigma_t[j] + delta_t[j] V_{t-1}[j] (the delta term not with DETACH_ROUTING)."""
    grad_u_hat = tl.zeros((BLOCK_B, J_PAD, D_PAD), ACC)
    for t in range(first_differentiable, iterations):
        offsets = (rows * iterations + t) * jd + state_offsets
        v_sum = tl.load(v_sum_ptr + offsets, mask=state_mask, other=0.0)
        sigma = tl.load(sigma_ptr + offsets, mask=state_mask, other=0.0)
        c = _couplings(u_hat, v_sum, caps_valid, leaky)
        grad_u_hat += c[:, :, None] * sigma
        if not DETACH_ROUTING:
            gamma = tl.sum(sigma * u_hat, axis=2)
            delta = c * (gamma - tl.sum(c * gamma, axis=1, keep_dims=True))
            grad_u_hat += delta[:, :, None] * v_sum  # 0 at t = 1, where V_0 = 0
    return tl.reshape(grad_u_hat, (BLOCK_B, J_PAD * D_PAD))


@triton.jit
def _grad_products(grad_flat, u_tile, w_tile, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    """(g W^T, U^T g) for a block: its grad u rows and its part of grad W, over a tile of
    input features (u_tile: samples x features, w_tile: features x J*D, both in ACC)."""
    if USE_DOT:
        grad_u_rows = tl.dot(grad_flat, tl.trans(w_tile), out_dtype=ACC, input_precision="ieee")
        grad_w_part = tl.dot(tl.trans(u_tile), grad_flat, out_dtype=ACC, input_precision="ieee")
    else:
        grad_u_rows = tl.sum(grad_flat[:, None, :] * w_tile[None, :, :], axis=2)
        grad_w_part = tl.sum(u_tile[:, :, None] * grad_flat[:, None, :], axis=0)
    return grad_u_rows, grad_w_part


@triton.jit
def _store_grad_u(grad_u_ptr, grad_u_rows, rows, capsule, last_row, in_caps, in_dim, first_feature,
                  BLOCK_B: tl.constexpr, DIN_TILE: tl.constexpr):
    sample = tl.reshape(rows, (BLOCK_B, 1))
    feature = first_feature + tl.arange(0, DIN_TILE)[None, :]
    tl.store(grad_u_ptr + (sample * in_caps + capsule) * in_dim + feature,
             grad_u_rows.to(grad_u_ptr.dtype.element_ty), mask=(sample < last_row) & (feature < in_dim))


@triton.jit
def _routing_final_kernel(
    u_ptr,  # (B, I, Din)
    w_ptr,  # (J, I, D, Din)
    v_sum_ptr,  # (B, r, J, D): V_{t-1}
    sigma_ptr,  # (B, r, J, D): dL/ds_t
    grad_u_ptr,  # (B, I, Din) u's dtype
    grad_w_ptr,  # (splits, J, I, D, Din): weight's dtype with one split and W resident, else acc
    batch, in_caps, out_caps, out_dim, in_dim, iterations, first_differentiable, first_capsule,
    samples_per_split, grad_w_split_stride,
    leaky,  # 1: leaky routing (_couplings), else 0
    DETACH_ROUTING: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
    DIN_PAD: tl.constexpr, DIN_TILE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Phase B for one input capsule i (first_capsule + program id 0) and one split of the
    batch (program id 1), BLOCK_B samples at a time, blocks in batch order:
    u_hat = U W_i, g[j] = sum_t c_t[j] sigma_t[j] + delta_t[j] V_{t-1}[j] per sample, then
    grad u[rows, i] = g W_i^T and grad W[:, i] += U^T g, the three products on tl.dot from 16
    samples up. The program owns its split's grad W[:, i]: no atomics, the batch sum in
    batch order; the launcher adds the splits' partials (torch.sum).

    W resident (DIN_TILE == DIN_PAD, configs.din_tile): W_i and its grad W are held in
    registers across the batch loop. Otherwise (capsules too large for that) both are
    streamed DIN_TILE input features at a time: W_i's tiles are loaded again at every block
    (from cache), and each block's part of grad W is added to the split's acc buffer in
    memory, which this program alone reads and writes, in batch order."""
    ACC = v_sum_ptr.dtype.element_ty
    W_RESIDENT: tl.constexpr = DIN_TILE == DIN_PAD
    capsule = tl.program_id(0).to(tl.int64) + first_capsule
    split = tl.program_id(1)
    if W_RESIDENT:
        w_offsets, w_mask = _w_tile_offsets(capsule, in_caps, out_caps, out_dim, in_dim, 0, J_PAD, D_PAD, DIN_PAD)
        # (DIN_PAD, J_PAD * D_PAD), held in ACC only: a half copy beside it spilled (sm_90).
        w_acc = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(ACC)
        grad_weight = tl.zeros((DIN_PAD, J_PAD * D_PAD), ACC)
    caps_valid = (tl.arange(0, J_PAD) < out_caps)[None, :]
    jd = out_caps * out_dim
    # The split's rows; the loop runs samples_per_split (an argument: a trip count computed here
    # made ptxas save registers on the stack around the loop, sm_80), the last split's extra
    # rows masked.
    first_row = split * samples_per_split
    last_row = tl.minimum(first_row + samples_per_split, batch)
    grad_w_split = grad_w_ptr + split.to(tl.int64) * grad_w_split_stride
    for offset in range(0, samples_per_split, BLOCK_B):
        rows, state_offsets, state_mask = _state_tile(first_row + offset, last_row, out_caps, out_dim, BLOCK_B,
                                                      J_PAD, D_PAD)
        if W_RESIDENT:
            u_acc = _u_tile(u_ptr, rows, capsule, last_row, in_caps, in_dim, 0, BLOCK_B, DIN_PAD).to(ACC)
            u_hat = _predict_from_tiles(u_acc, w_acc, BLOCK_B, J_PAD, D_PAD, USE_DOT, ACC, DOT_PRECISION)
        else:
            u_hat = _predict(u_ptr, w_ptr, rows, capsule, last_row, in_caps, out_caps, out_dim, in_dim,
                             BLOCK_B, J_PAD, D_PAD, DIN_PAD, DIN_TILE, USE_DOT, ACC, DOT_PRECISION)
        grad_flat = _grad_u_hat(u_hat, v_sum_ptr, sigma_ptr, rows, state_offsets, state_mask, jd, iterations,
                                first_differentiable, caps_valid, leaky, BLOCK_B, J_PAD, D_PAD, DETACH_ROUTING,
                                ACC)
        if W_RESIDENT:
            grad_u_rows, grad_w_part = _grad_products(grad_flat, u_acc, w_acc, USE_DOT, ACC)
            grad_weight += grad_w_part
            _store_grad_u(grad_u_ptr, grad_u_rows, rows, capsule, last_row, in_caps, in_dim, 0, BLOCK_B, DIN_PAD)
        else:
            for first_feature in range(0, DIN_PAD, DIN_TILE):
                w_offsets, w_mask = _w_tile_offsets(capsule, in_caps, out_caps, out_dim, in_dim, first_feature,
                                                    J_PAD, D_PAD, DIN_TILE)
                w_tile = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(ACC)
                u_tile = _u_tile(u_ptr, rows, capsule, last_row, in_caps, in_dim, first_feature, BLOCK_B,
                                 DIN_TILE).to(ACC)
                grad_u_rows, grad_w_part = _grad_products(grad_flat, u_tile, w_tile, USE_DOT, ACC)
                _store_grad_u(grad_u_ptr, grad_u_rows, rows, capsule, last_row, in_caps, in_dim, first_feature,
                              BLOCK_B, DIN_TILE)
                # The sum so far (none before the first block), then this block's part.
                so_far = tl.load(grad_w_split + w_offsets, mask=w_mask & (offset > 0), other=0.0)
                tl.store(grad_w_split + w_offsets, so_far + grad_w_part, mask=w_mask)
            # The next block reads what this one wrote: make it visible across the program's threads.
            tl.debug_barrier()
    if W_RESIDENT:
        # The offsets again, not kept live across the loop (ptxas put them on the stack: sm_90),
        # and from capsule 0 plus the capsule's base, not as the prologue wrote them: ptxas
        # merged two identical forms and kept the result across the loop on the stack (8
        # bytes, Triton 3.6, sm_80, the 16-sample tl.dot step).
        w_offsets, w_mask = _w_tile_offsets(0, in_caps, out_caps, out_dim, in_dim, 0, J_PAD, D_PAD, DIN_PAD)
        capsule_base = grad_w_split + capsule * out_dim * in_dim
        tl.store(capsule_base + w_offsets, grad_weight.to(grad_w_ptr.dtype.element_ty), mask=w_mask)


@triton.jit
def _votes_gradient_kernel(
    votes_ptr,  # (B, I, J, D)
    v_sum_ptr,  # (B, r, J, D): V_{t-1}
    sigma_ptr,  # (B, r, J, D): dL/ds_t
    grad_votes_ptr,  # (B, I, J, D) votes' dtype
    batch, in_caps, out_caps, out_dim, iterations, first_differentiable, caps_per_chunk,
    leaky,  # 1: leaky routing (_couplings), else 0
    DETACH_ROUTING: tl.constexpr, BLOCK_B: tl.constexpr, J_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Phase B of routing from given votes, for a block of rows and a chunk of input capsules
    (the passes' grid): grad votes[rows, i] = dL/du_hat (_grad_u_hat) for each capsule i.
    Nothing is summed across rows or capsules, so no order needs fixing and no W is touched."""
    ACC = v_sum_ptr.dtype.element_ty
    rows, state_offsets, state_mask = _state_tile(tl.program_id(0) * BLOCK_B, batch, out_caps, out_dim,
                                                  BLOCK_B, J_PAD, D_PAD)
    caps_valid = (tl.arange(0, J_PAD) < out_caps)[None, :]
    jd = out_caps * out_dim
    first = tl.program_id(1).to(tl.int64) * caps_per_chunk
    last = tl.minimum(first + caps_per_chunk, in_caps)
    for capsule in range(first, last):
        u_hat = _votes_tile(votes_ptr, rows, capsule, in_caps, jd, state_offsets, state_mask, ACC)
        grad_flat = _grad_u_hat(u_hat, v_sum_ptr, sigma_ptr, rows, state_offsets, state_mask, jd, iterations,
                                first_differentiable, caps_valid, leaky, BLOCK_B, J_PAD, D_PAD, DETACH_ROUTING,
                                ACC)
        grad = tl.reshape(grad_flat, (BLOCK_B, J_PAD, D_PAD)).to(grad_votes_ptr.dtype.element_ty)
        tl.store(grad_votes_ptr + (rows * in_caps + capsule) * jd + state_offsets, grad, mask=state_mask)


# True when TRITON_INTERPRET=1 was set before triton decorated the kernels: they run on CPU.
INTERPRETED = isinstance(_routing_pass_kernel, InterpretedFunction)
