// The lane layout of the C++ dynamic-routing kernels: input capsules in blocks of kLanes,
// one vector per per-capsule quantity of a block. Dims, the packed inputs (Packed), and the
// in-register transposes that move u and W into the layout and their gradients out of it.

#pragma once

#include "../common/simd.h"
#include "tuning.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

FASTCAPS_KERNELS_BEGIN

struct Dims {
  int64_t batch, in_caps, in_dim, out_caps, out_dim, iterations;
  bool leaky;  // leaky routing: a zero logit joins every capsule's softmax over J (DESIGN.md section 7)
  int64_t jd() const { return out_caps * out_dim; }
  template <typename T>
  int64_t blocks() const { return (in_caps + kLanes<T> - 1) / kLanes<T>; }
  template <typename T>
  int64_t chunks() const { return (blocks<T>() + kChunkBlocks - 1) / kChunkBlocks; }
};

inline bool samples_in_parallel(int64_t batch) {
  return batch >= kSamplesPerThread * at::get_num_threads();
}

// u in the lane layout, the raw W, and the shared packed W when samples run in parallel.
// (Otherwise W is packed per chunk or block where it is used: writing out 5.9 MB of packed
// MNIST weights costs more than the passes at small batches.)
template <typename T>
struct Packed {
  Dims d;
  int64_t jd, blocks, chunks;
  const T* weight;              // (J, I, D, Din); packed per block: [e, j*D + d][l] = W[j, blk*L + l, d, e]
  std::vector<int64_t> offset;  // see packed_offsets
  std::vector<int64_t> row_outputs;  // see row_lane_outputs; empty where Din rules out predict_from_rows
  LaneArray<T> packed_weight;   // (blocks, Din, jd), or empty
  LaneArray<T> inputs;          // (B, blocks, Din): inputs[b, blk, e][l] = u[b, blk*L + l, e]
  bool parallel_samples;        // run_passes' schedule: samples in parallel (else chunks, per group)
  const T* votes = nullptr;     // route_votes: (N, I, J, D), the u_hat a pass that predicts reads (votes.h)

  int64_t block_size() const { return d.in_dim * jd; }  // vectors of packed W per block
  const Vec<T>* input_block(int64_t b, int64_t blk) const { return inputs.data() + (b * blocks + blk) * d.in_dim; }
};

// W[j, i] is a D x Din matrix, read as a row of columns c = d * Din + e; the packed block
// holds column c of W[j, i] at offset[c] + j * D, offset[c] = e * jd + d. A tile covers
// kLanes capsules and kLanes columns. (The offsets are tabulated: a division per stored
// vector cost more than the transpose.)
inline std::vector<int64_t> packed_offsets(const Dims& d) {
  std::vector<int64_t> offset(d.out_dim * d.in_dim);
  for (int64_t dd = 0; dd < d.out_dim; ++dd)
    for (int64_t e = 0; e < d.in_dim; ++e) offset[dd * d.in_dim + e] = e * d.jd() + dd;
  return offset;
}

template <typename T>
void pack_weight_block(const Dims& d, const int64_t* offset, const T* weight, int64_t blk, Vec<T>* out) {
  const int64_t L = kLanes<T>, columns = d.out_dim * d.in_dim, used = std::min(L, d.in_caps - blk * L);
  Vec<T> tile[kLanes<T>];
  for (int64_t j = 0; j < d.out_caps; ++j) {
    // The block's capsules of W[j] are one contiguous run, read by tiles in an order strided
    // by rows; asking for the next run ahead lets a cold W stream from memory.
    if (j + 1 < d.out_caps) prefetch(weight + ((j + 1) * d.in_caps + blk * L) * columns, used * columns);
    for (int64_t c0 = 0; c0 < columns; c0 += L) {
      const int64_t n = std::min(L, columns - c0);
      load_tile(weight + (j * d.in_caps + blk * L) * columns + c0, columns, used, n, tile);
      transpose<T>(tile);
      for (int64_t q = 0; q < n; ++q) out[offset[c0 + q] + j * d.out_dim] = tile[q];
    }
  }
}

// The inverse of pack_weight_block, for grad W.
template <typename T>
FASTCAPS_INLINE void unpack_weight_block(const Dims& d, const int64_t* offset, const Vec<T>* packed, int64_t blk,
                                         T* weight) {
  const int64_t L = kLanes<T>, columns = d.out_dim * d.in_dim, used = std::min(L, d.in_caps - blk * L);
  Vec<T> tile[kLanes<T>];
  for (int64_t j = 0; j < d.out_caps; ++j)
    for (int64_t c0 = 0; c0 < columns; c0 += L) {
      const int64_t n = std::min(L, columns - c0);
      for (int64_t q = 0; q < L; ++q) tile[q] = q < n ? packed[offset[c0 + q] + j * d.out_dim] : Vec<T>{};
      transpose<T>(tile);
      store_tile(tile, used, n, weight + (j * d.in_caps + blk * L) * columns + c0, columns);
    }
}

// u[b, blk*L + l, e] -> out[e][l], and back (grad u).
template <typename T>
void pack_input_block(const Dims& d, const T* u, int64_t b, int64_t blk, Vec<T>* out) {
  const int64_t L = kLanes<T>, used = std::min(L, d.in_caps - blk * L);
  Vec<T> tile[kLanes<T>];
  for (int64_t c0 = 0; c0 < d.in_dim; c0 += L) {
    const int64_t n = std::min(L, d.in_dim - c0);
    load_tile(u + (b * d.in_caps + blk * L) * d.in_dim + c0, d.in_dim, used, n, tile);
    transpose<T>(tile);
    if (n == L)  // a constant count: the copy of a run-time count became a rep movs of the tile
      for (int64_t q = 0; q < L; ++q) out[c0 + q] = tile[q];
    else
      for (int64_t q = 0; q < n; ++q) out[c0 + q] = tile[q];
  }
}

// dst[l * stride + c] = packed[c][l] for c < n and l < used: n lane-layout vectors back to
// one row per capsule.
template <typename T>
FASTCAPS_INLINE void unpack_lanes(const Vec<T>* packed, int64_t n, int64_t used, T* dst, int64_t stride) {
  const int64_t L = kLanes<T>;
  Vec<T> tile[kLanes<T>];
  for (int64_t c0 = 0; c0 < n; c0 += L) {
    const int64_t columns = std::min(L, n - c0);
    for (int64_t q = 0; q < L; ++q) tile[q] = q < columns ? packed[c0 + q] : Vec<T>{};
    transpose<T>(tile);
    store_tile(tile, used, columns, dst + c0, stride);
  }
}

template <typename T>
FASTCAPS_INLINE void unpack_input_block(const Dims& d, const Vec<T>* packed, int64_t b, int64_t blk, T* u) {
  const int64_t L = kLanes<T>;
  unpack_lanes(packed, d.in_dim, std::min(L, d.in_caps - blk * L), u + (b * d.in_caps + blk * L) * d.in_dim, d.in_dim);
}

// votes (N, I, J, D) as rows of u with J*D "input features": pack_input_block and
// unpack_input_block then move them into and out of the lane layout (route_votes).
inline Dims votes_rows(const Dims& d) {
  Dims rows = d;
  rows.in_dim = d.jd();
  return rows;
}

FASTCAPS_KERNELS_END
