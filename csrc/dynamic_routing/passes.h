// The routing pass of the C++ kernels (DESIGN.md section 2) and its two schedules: u_hat of a
// block, couplings, coupling gradients and the lane-wise sums over capsules, swept over a
// chunk of capsules (sweep_chunk), and run for every sample and pass (run_passes).

#pragma once

#include "../common/parallel.h"
#include "layout.h"
#include "rows.h"
#include "tuning.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

FASTCAPS_KERNELS_BEGIN

template <typename T>
Packed<T> pack(const Dims& d, const T* u, const T* weight, bool share_weight) {
  const int64_t Din = d.in_dim, blocks = d.blocks<T>();
  Packed<T> p{d, d.jd(), blocks, d.chunks<T>(), weight, packed_offsets(d), row_lane_outputs<T>(d),
              LaneArray<T>(share_weight ? blocks * Din * d.jd() : 0), LaneArray<T>(d.batch * blocks * Din),
              share_weight};
  if (share_weight)
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk)
        pack_weight_block(d, p.offset.data(), weight, blk, p.packed_weight.data() + blk * p.block_size());
    });
  at::parallel_for(0, d.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item)
      pack_input_block(d, u, item / blocks, item % blocks, p.inputs.data() + item * Din);
  });
  return p;
}

template <typename T>
struct Scratch {
  // couplings and logit_grads: J vectors per iteration (prediction_gradients keeps every
  // iteration's); couplings also holds a backward pass's c for kDotBlocks blocks
  // (sweep_chunk); capsule_weights: a tile's c_ij or delta_ij for a chunk (sweep_chunk).
  LaneArray<T> couplings, logit_grads, capsule_weights, sums, row, row_grad, weight, weight_grad, input_grad;
  explicit Scratch(const Packed<T>& p)
      : couplings(std::max(p.d.iterations, kDotBlocks) * p.d.out_caps), logit_grads(p.d.iterations * p.d.out_caps),
        capsule_weights(kSampleTile * kChunkBlocks * p.d.out_caps), sums(p.jd), row(kSampleTile * p.jd),
        row_grad(kSampleTile * p.jd), weight(kChunkBlocks * p.block_size()), weight_grad(p.block_size()),
        input_grad(kSampleTile * p.d.in_dim) {}

  // W of blocks [first, last): the shared packed copy if there is one, else packed here;
  // null for route_votes (no W).
  const Vec<T>* packed_weight(const Packed<T>& p, int64_t first, int64_t last) {
    if (p.votes != nullptr) return nullptr;
    if (p.packed_weight.size() > 0) return p.packed_weight.data() + first * p.block_size();
    TORCH_INTERNAL_ASSERT(last - first <= kChunkBlocks);
    for (int64_t blk = first; blk < last; ++blk)
      pack_weight_block(p.d, p.offset.data(), p.weight, blk, weight.data() + (blk - first) * p.block_size());
    return weight.data();
  }
  // W of chunk `chunk`'s blocks, as packed_weight gives it.
  const Vec<T>* chunk_weight(const Packed<T>& p, int64_t chunk) {
    return packed_weight(p, chunk * kChunkBlocks, std::min(p.blocks, (chunk + 1) * kChunkBlocks));
  }
};

// u_hat of one block for S samples: uh[s][k] = sum_e x[s][e] * w[e, k] for k < jd, e in
// order. Each vector of w is loaded once for the S samples, and kAccumulators / S outputs of
// each sample are formed at a time, so that the accumulators stay in registers. A sample's
// sums are the same whatever S.
template <typename T, int64_t S>
FASTCAPS_INLINE void predict(const Vec<T>* const* x, const Vec<T>* w, int64_t in_dim, int64_t jd, Vec<T>* const* uh) {
  constexpr int64_t kUnroll = std::max<int64_t>(kAccumulators / S, 1);
  int64_t k = 0;
  for (; k + kUnroll <= jd; k += kUnroll) {
    Vec<T> acc[S][kUnroll] = {};
    for (int64_t e = 0; e < in_dim; ++e) {
      const Vec<T>* we = w + e * jd + k;
      for (int64_t q = 0; q < kUnroll; ++q) {
        const Vec<T> weq = we[q];
        for (int64_t s = 0; s < S; ++s) acc[s][q] += x[s][e] * weq;
      }
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t q = 0; q < kUnroll; ++q) uh[s][k + q] = acc[s][q];
  }
  for (; k < jd; ++k) {
    Vec<T> acc[S] = {};
    for (int64_t e = 0; e < in_dim; ++e)
      for (int64_t s = 0; s < S; ++s) acc[s] += x[s][e] * w[e * jd + k];
    for (int64_t s = 0; s < S; ++s) uh[s][k] = acc[s];
  }
}

// Calls f(std::integral_constant<int64_t, n>{}): 1 <= n <= N as a compile-time constant.
template <int64_t N, typename F>
FASTCAPS_INLINE void with_count_up_to(int64_t n, const F& f) {
  if constexpr (N > 1)
    if (n < N) return with_count_up_to<N - 1>(n, f);
  f(std::integral_constant<int64_t, N>{});
}

// Calls f with n <= kSampleTile samples as a compile-time constant.
template <typename F>
FASTCAPS_INLINE void with_tile_size(int64_t n, const F& f) {
  TORCH_INTERNAL_ASSERT(n >= 1 && n <= kSampleTile, "routing_cpu: a tile of ", n, " samples");
  with_count_up_to<kSampleTile>(n, f);
}

// out[n * M + m][j] = sum_d a[m][j*D + d] * uh[n][j*D + d], lane-wise, d in order, for M
// vectors a, N blocks' uh and `count` capsules from j0 at once: each sum is a chain of D
// dependent FMAs, and one chain at a time left the FMA units waiting on its latency (perf on
// AVX2: the hottest line of the passes). Each vector of uh is loaded once for the M dot
// products, and each broadcast of a once for the N blocks (a is the same for every block of
// a sample: loading it per block made the dots bound by loads, perf on AVX2, Zen 3).
template <typename T, int64_t M, int64_t N, int64_t count>
FASTCAPS_INLINE void capsule_dots_from(const Vec<T>* const* uh, const T* const* a, int64_t j0, int64_t D,
                                       Vec<T>* const* out) {
  Vec<T> acc[N][M][count] = {};
  for (int64_t dd = 0; dd < D; ++dd)
    for (int64_t q = 0; q < count; ++q) {
      const int64_t k = (j0 + q) * D + dd;
      Vec<T> u[N];
      for (int64_t n = 0; n < N; ++n) u[n] = uh[n][k];
      for (int64_t m = 0; m < M; ++m) {
        const T am = a[m][k];
        for (int64_t n = 0; n < N; ++n) acc[n][m][q] += am * u[n];
      }
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t q = 0; q < count; ++q) out[n * M + m][j0 + q] = acc[n][m][q];
}

// out[n * M + m][j] = uh[n]_j . a[m]_j for every j < J, m < M and n < N, in groups of
// near-equal size of at most kAccumulators / (M N) capsules: J = 10 on AVX2 as 5 + 5
// (M = N = 1) or 4 + 3 + 3 (M N = 2), not 8 + 2, whose 2 chains of D dependent FMAs took as
// long as the 8 (perf on AVX2, Zen 3). Grouping changes no sum.
template <typename T, int64_t M, int64_t N>
FASTCAPS_INLINE void capsule_dots(const Vec<T>* const* uh, const T* const* a, int64_t J, int64_t D,
                                  Vec<T>* const* out) {
  static_assert(M * N <= kAccumulators, "capsule_dots: more dot products than accumulators");
  constexpr int64_t kChains = kAccumulators / (M * N);
  for (int64_t j = 0, groups = (J + kChains - 1) / kChains; j < J; --groups) {
    const int64_t count = (J - j + groups - 1) / groups;
    with_count_up_to<kChains>(count, [&](auto chains) __attribute__((always_inline)) {
      capsule_dots_from<T, M, N, chains()>(uh, a, j, D, out);
    });
    j += count;
  }
}

// c[j] = softmax_j(c[j]) lane-wise; with leaky, over the J logits and one more of 0, which
// is then dropped: exp(c_j) / (1 + sum_k exp(c_k)).
template <typename T>
FASTCAPS_INLINE void softmax_over_capsules(int64_t J, bool leaky, Vec<T>* c) {
  Vec<T> largest = c[0];
  for (int64_t j = 1; j < J; ++j) largest = c[j] > largest ? c[j] : largest;
  Vec<T> total = {};
  if (leaky) {
    largest = largest > T(0) ? largest : Vec<T>{};
    total = exp_nonpositive<T>(-largest);
  }
  for (int64_t j = 0; j < J; ++j) {
    c[j] = exp_nonpositive<T>(c[j] - largest);
    total += c[j];
  }
  const Vec<T> inverse = T(1) / total;
  for (int64_t j = 0; j < J; ++j) c[j] *= inverse;
}

// delta[j] = dL/dlogit_j = c_j (gamma_j - sum_k c_k gamma_k) from gamma_j = sigma_j . uh_j
// (held in delta): the gradient through the couplings (DESIGN.md section 3), lane-wise.
template <typename T>
FASTCAPS_INLINE void logit_gradients_from_gammas(const Vec<T>* c, int64_t J, Vec<T>* delta) {
  Vec<T> mean = {};
  for (int64_t j = 0; j < J; ++j) mean += c[j] * delta[j];
  for (int64_t j = 0; j < J; ++j) delta[j] = c[j] * (delta[j] - mean);
}

// The first iteration's couplings, before any agreement: 1/J, or 1/(J+1) with leaky.
template <typename T>
FASTCAPS_INLINE Vec<T> uniform_coupling(int64_t J, bool leaky) {
  return Vec<T>{} + T(1) / T(J + leaky);
}

// c[n][j] = softmax_j(uh[n]_j . v_sum_j) lane-wise for N blocks of one sample; uniform 1/J
// (1/(J+1) with leaky) when v_sum is null (first pass).
template <typename T, int64_t N = 1>
FASTCAPS_INLINE void couplings(const Vec<T>* const* uh, const T* v_sum, int64_t J, int64_t D, bool leaky,
                               Vec<T>* const* c) {
  if (v_sum == nullptr) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < J; ++j) c[n][j] = uniform_coupling<T>(J, leaky);
    return;
  }
  capsule_dots<T, 1, N>(uh, &v_sum, J, D, c);
  for (int64_t n = 0; n < N; ++n) softmax_over_capsules<T>(J, leaky, c[n]);
}

// The couplings c[n] of an iteration past the first (v_sum not null) and their logit
// gradients delta[n] (logit_gradients_from_gammas) for N blocks of one sample, both dot
// products taken in one read of uh.
template <typename T, int64_t N = 1>
FASTCAPS_INLINE void couplings_and_logit_gradients(const Vec<T>* const* uh, const T* v_sum, const T* sigma,
                                                   int64_t J, int64_t D, bool leaky, Vec<T>* const* c,
                                                   Vec<T>* const* delta) {
  const T* a[2] = {v_sum, sigma};
  Vec<T>* out[2 * N];
  for (int64_t n = 0; n < N; ++n) out[2 * n] = c[n], out[2 * n + 1] = delta[n];
  capsule_dots<T, 2, N>(uh, a, J, D, out);
  for (int64_t n = 0; n < N; ++n) {
    softmax_over_capsules<T>(J, leaky, c[n]);
    logit_gradients_from_gammas<T>(c[n], J, delta[n]);
  }
}

// One routing pass over one chunk of a sample's capsules, written to partial (jd values):
//   forward  (sigma null):     sum_i c_ij uh_ij, the chunk's share of s_t;
//   backward (sigma not null): sum_i delta_ij uh_ij, its share of dL/dV_{t-1}.
// v_sum is V_{t-1} = v_1 + ... + v_{t-1} (null on the first forward pass: uniform
// couplings). With predict the chunk's u_hat is computed into uh (the sample's buffer,
// blocks x jd vectors), from the chunk's packed W or, when that is null, from W's rows, or
// for route_votes (Packed::votes) transposed from the votes; else it is read from uh.
// With kept_weights (and, backward, kept_couplings) the pass leaves its capsule weights (c_ij
// forward, delta_ij backward) and a backward pass its c_ij there, J vectors per block at
// blk * J for every block of the sample, instead of in scratch for the chunk only.
template <typename T>
struct Pass {
  int64_t sample, chunk;
  bool predict;
  const T* v_sum;
  const T* sigma;
  Vec<T>* kept_weights = nullptr;
  Vec<T>* kept_couplings = nullptr;
};

// Up to kSampleTile samples' passes over the same chunk, swept together so that their u_hat
// is formed from one read of the chunk's W (predict). Each sample's arithmetic is the same
// as if it were swept alone.
template <typename T>
struct Tile {
  int64_t count = 0;
  Pass<T> pass[kSampleTile];
  Vec<T>* uh[kSampleTile];
  T* partial[kSampleTile];
  void add(const Pass<T>& sample_pass, Vec<T>* sample_uh, T* sample_partial) {
    TORCH_INTERNAL_ASSERT(count < kSampleTile);
    pass[count] = sample_pass, uh[count] = sample_uh, partial[count] = sample_partial;
    ++count;
  }
};

// sums[j*D + d] = sum over the chunk's blocks, in order, of weights[blk, j] * uh[blk, j*D + d]:
// per output capsule j the blocks' weights are taken once, out of the loop over d. Blocks is
// the chunk's block count as a constant for a whole chunk (kChunkBlocks), else 0 and
// `blocks` (at most kChunkBlocks) is used: with the loop over blocks innermost and its length
// known at run time only, every output waited on its own chain of loads and FMAs (perf on
// AVX2, Zen 3: the hottest line of sweep_chunk).
template <typename T, int64_t Blocks>
FASTCAPS_INLINE void chunk_sums(const Vec<T>* weights, const Vec<T>* uh, int64_t blocks, int64_t J, int64_t D,
                                int64_t jd, Vec<T>* sums) {
  const int64_t count = Blocks > 0 ? Blocks : blocks;
  for (int64_t j = 0; j < J; ++j) {
    Vec<T> wj[kChunkBlocks];
    for (int64_t blk = 0; blk < count; ++blk) wj[blk] = weights[blk * J + j];
    for (int64_t dd = 0; dd < D; ++dd) {
      Vec<T> acc = {};
      for (int64_t blk = 0; blk < count; ++blk) acc += wj[blk] * uh[blk * jd + j * D + dd];
      sums[j * D + dd] = acc;
    }
  }
}

// Each sample's c_ij (forward) or delta_ij (backward) for every block of the chunk first,
// then its sums over the chunk's capsules, sum_i weight_ij uh_ij, one output at a time in
// a register, blocks in order: a read-modify-write of the sums per block left the loop
// waiting on loads and stores (perf on AVX2).
template <typename T>
void sweep_chunk(const Packed<T>& p, const Tile<T>& tile, const Vec<T>* chunk_weight, Scratch<T>& scratch) {
  const int64_t J = p.d.out_caps, D = p.d.out_dim, jd = p.jd, n = tile.count;
  const bool predict_here = tile.pass[0].predict;
  const int64_t first = tile.pass[0].chunk * kChunkBlocks, last = std::min(p.blocks, first + kChunkBlocks);
  const auto capsule_weights = [&](int64_t s, int64_t blk) {
    Vec<T>* kept = tile.pass[s].kept_weights;
    return kept != nullptr ? kept + blk * J : scratch.capsule_weights.data() + (s * kChunkBlocks + blk - first) * J;
  };
  // Blocks in groups of kDotBlocks: u_hat of each, then each sample's couplings for the
  // group from one load of its V (and sigma) per output (capsule_dots).
  for (int64_t group = first; group < last; group += kDotBlocks) {
    const int64_t blocks = std::min(kDotBlocks, last - group);
    for (int64_t blk = group; blk < group + blocks; ++blk) {
      const Vec<T>* x[kSampleTile];
      Vec<T>* uh[kSampleTile];
      for (int64_t s = 0; s < n; ++s) {
        x[s] = p.input_block(tile.pass[s].sample, blk);
        uh[s] = tile.uh[s] + blk * jd;
      }
      if (predict_here && p.votes != nullptr) {
        for (int64_t s = 0; s < n; ++s) {
          // The next block's votes (one contiguous run) asked for while this one is transposed.
          const int64_t next = std::min(blk + 1, p.blocks - 1) * kLanes<T>, sample = tile.pass[s].sample;
          prefetch(p.votes + (sample * p.d.in_caps + next) * jd, std::min(kLanes<T>, p.d.in_caps - next) * jd);
          pack_input_block(votes_rows(p.d), p.votes, sample, blk, uh[s]);
        }
      } else if (predict_here && chunk_weight != nullptr) {
        const Vec<T>* w = chunk_weight + (blk - first) * p.block_size();
        with_tile_size(n, [&](auto S) __attribute__((always_inline)) { predict<T, S()>(x, w, p.d.in_dim, jd, uh); });
      } else if (predict_here) {
        for (int64_t s = 0; s < n; ++s) predict_from_rows<T>(p, blk, x[s], uh[s]);
      }
    }
    for (int64_t s = 0; s < n; ++s) {
      const Pass<T>& pass = tile.pass[s];
      const Vec<T>* uh[kDotBlocks];
      Vec<T>* weights[kDotBlocks];
      Vec<T>* c[kDotBlocks];
      for (int64_t q = 0; q < blocks; ++q) {
        uh[q] = tile.uh[s] + (group + q) * jd;
        weights[q] = capsule_weights(s, group + q);
        // a backward pass's couplings: needed only here, unless kept
        c[q] = pass.kept_couplings != nullptr ? pass.kept_couplings + (group + q) * J : scratch.couplings.data() + q * J;
      }
      with_count_up_to<kDotBlocks>(blocks, [&](auto N) __attribute__((always_inline)) {
        if (pass.sigma == nullptr)
          couplings<T, N()>(uh, pass.v_sum, J, D, p.d.leaky, weights);
        else
          couplings_and_logit_gradients<T, N()>(uh, pass.v_sum, pass.sigma, J, D, p.d.leaky, c, weights);
      });
    }
  }
  Vec<T>* sums = scratch.sums.data();
  for (int64_t s = 0; s < n; ++s) {
    if (last - first == kChunkBlocks)
      chunk_sums<T, kChunkBlocks>(capsule_weights(s, first), tile.uh[s] + first * jd, last - first, J, D, jd, sums);
    else
      chunk_sums<T, 0>(capsule_weights(s, first), tile.uh[s] + first * jd, last - first, J, D, jd, sums);
    lane_sums<T>(sums, jd, tile.partial[s]);
  }
}

// Passes k = 0 .. steps - 1 of the samples b0 .. b0 + n - 1 (n <= kSampleTile), swept
// together chunk by chunk: sample s's u_hat at uh + s * blocks * jd, its chunk partials at
// partials + s * chunks * jd, finish(b, k, partials) after each pass. The many-samples unit of
// run_passes, and the votes backward's per-sample phase A (votes.h).
template <typename T, typename PassOf, typename Finish>
void tile_passes(const Packed<T>& p, int64_t steps, const PassOf& pass_of, const Finish& finish, int64_t b0, int64_t n,
                 Vec<T>* uh, T* partials, Scratch<T>& scratch) {
  const int64_t per_sample = p.blocks * p.jd, partials_per_sample = p.chunks * p.jd;
  for (int64_t k = 0; k < steps; ++k) {
    for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
      Tile<T> tile;
      for (int64_t s = 0; s < n; ++s)
        tile.add(pass_of(b0 + s, k, chunk), uh + s * per_sample, partials + s * partials_per_sample + chunk * p.jd);
      sweep_chunk(p, tile, tile.pass[0].predict ? scratch.chunk_weight(p, chunk) : nullptr, scratch);
    }
    for (int64_t s = 0; s < n; ++s) finish(b0 + s, k, partials + s * partials_per_sample);
  }
}

// Runs `steps` passes for every sample: pass k of sample b sweeps all its chunks
// (pass_of(b, k, chunk) says how), then finish(b, k, partials) combines the chunk partials.
// Two schedules; a sample's arithmetic is the same in both, and whatever the thread count:
// - many samples: parallel over tiles of kSampleTile samples, each thread sweeping the tiles
//   it takes (parallel_items) with a u_hat buffer per sample, reading the shared packed W;
// - few samples: in groups (kGroupBytes of u_hat buffers), each pass parallel over chunks,
//   each chunk walking the group's samples in tiles with its W packed once.
// With `kept_u_hat` (B x blocks x jd vectors; the launcher asks for it at small batches,
// kKeepUHatSamples) every sample's u_hat lives there instead of in a scratch
// buffer: the forward leaves it for the backward, whose passes then read it.
template <typename T, typename PassOf, typename Finish>
void run_passes(const Packed<T>& p, int64_t steps, const PassOf& pass_of, const Finish& finish, Vec<T>* kept_u_hat) {
  const int64_t per_sample = p.blocks * p.jd, partials_per_sample = p.chunks * p.jd, B = p.d.batch;
  if (steps == 0 || B == 0) return;
  if (p.parallel_samples) {
    // Tiles share each read of a chunk's W; votes have no W to share, and one sample's u_hat
    // alone stays nearer the core (L2) across the passes.
    const int64_t tile_size = p.votes != nullptr ? 1 : kSampleTile;
    struct ThreadState {
      LaneArray<T> uh;
      std::vector<T> partials;
      Scratch<T> scratch;
    };
    const auto make_state = [&] {
      return ThreadState{LaneArray<T>(kept_u_hat == nullptr ? tile_size * per_sample : 0),
                         std::vector<T>(tile_size * partials_per_sample), Scratch<T>(p)};
    };
    parallel_items((B + tile_size - 1) / tile_size, make_state, [&](int64_t tile_index, ThreadState& state) {
      const int64_t b0 = tile_index * tile_size, n = std::min(tile_size, B - b0);
      Vec<T>* uh = kept_u_hat == nullptr ? state.uh.data() : kept_u_hat + b0 * per_sample;
      tile_passes(p, steps, pass_of, finish, b0, n, uh, state.partials.data(), state.scratch);
    });
    return;
  }
  const int64_t group = kept_u_hat != nullptr ? B
      : std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(per_sample * sizeof(Vec<T>), 1), 1, B);
  LaneArray<T> scratch_uh(kept_u_hat == nullptr ? group * per_sample : 0);
  Vec<T>* uh = kept_u_hat == nullptr ? scratch_uh.data() : kept_u_hat;
  std::vector<T> partials(group * partials_per_sample);
  for (int64_t start = 0; start < B; start += group) {
    const int64_t size = std::min(group, B - start);
    // A chunk's W that serves one sample is read by rows where Din allows, not packed.
    const bool from_rows = size == 1 && !p.row_outputs.empty();
    for (int64_t k = 0; k < steps; ++k) {
      at::parallel_for(0, p.chunks, 1, [&](int64_t begin, int64_t end) {
        Scratch<T> scratch(p);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const bool packs = pass_of(start, k, chunk).predict && !from_rows;
          const Vec<T>* weight = packs ? scratch.chunk_weight(p, chunk) : nullptr;
          for (int64_t b0 = 0; b0 < size; b0 += kSampleTile) {
            Tile<T> tile;
            for (int64_t b = b0; b < std::min(size, b0 + kSampleTile); ++b)
              tile.add(pass_of(start + b, k, chunk), uh + b * per_sample,
                       partials.data() + (b * p.chunks + chunk) * p.jd);
            sweep_chunk(p, tile, weight, scratch);
          }
        }
      });
      for (int64_t b = 0; b < size; ++b) finish(start + b, k, partials.data() + b * partials_per_sample);
    }
  }
}

// out[k] = sum over chunks of partials[chunk, k], in chunk order.
template <typename T>
void sum_chunks(const T* partials, int64_t chunks, int64_t jd, T* out) {
  std::fill(out, out + jd, T(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < jd; ++k) out[k] += partials[chunk * jd + k];
}

FASTCAPS_KERNELS_END
