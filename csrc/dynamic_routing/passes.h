// The routing pass of the C++ kernels (DESIGN.md section 2) and its two schedules: u_hat of a
// block, couplings, coupling gradients and the lane-wise sums over capsules, swept over a
// chunk of capsules (sweep_chunk), and run for every sample and pass (run_passes).

#pragma once

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
              LaneArray<T>(share_weight ? blocks * Din * d.jd() : 0), LaneArray<T>(d.batch * blocks * Din)};
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
  LaneArray<T> couplings, logit_grads, sums, row, row_grad, weight, weight_grad, input_grad;
  explicit Scratch(const Packed<T>& p)
      : couplings(p.d.out_caps), logit_grads(p.d.out_caps), sums(p.jd), row(p.jd), row_grad(p.jd),
        weight(kChunkBlocks * p.block_size()), weight_grad(p.block_size()), input_grad(p.d.in_dim) {}

  // W of blocks [first, last): the shared packed copy if there is one, else packed here.
  const Vec<T>* packed_weight(const Packed<T>& p, int64_t first, int64_t last) {
    if (p.packed_weight.size() > 0) return p.packed_weight.data() + first * p.block_size();
    TORCH_INTERNAL_ASSERT(last - first <= kChunkBlocks);
    for (int64_t blk = first; blk < last; ++blk)
      pack_weight_block(p.d, p.offset.data(), p.weight, blk, weight.data() + (blk - first) * p.block_size());
    return weight.data();
  }
};

// u_hat of one block: uh[k] = sum_e x[e] * w[e, k] for k < jd. Eight outputs at a time so
// that eight independent accumulators stay in registers.
template <typename T>
FASTCAPS_INLINE void predict(const Vec<T>* x, const Vec<T>* w, int64_t in_dim, int64_t jd, Vec<T>* uh) {
  constexpr int64_t kUnroll = 8;
  int64_t k = 0;
  for (; k + kUnroll <= jd; k += kUnroll) {
    Vec<T> acc[kUnroll] = {};
    for (int64_t e = 0; e < in_dim; ++e) {
      const Vec<T> xe = x[e];
      const Vec<T>* we = w + e * jd + k;
      for (int64_t q = 0; q < kUnroll; ++q) acc[q] += xe * we[q];
    }
    for (int64_t q = 0; q < kUnroll; ++q) uh[k + q] = acc[q];
  }
  for (; k < jd; ++k) {
    Vec<T> acc = {};
    for (int64_t e = 0; e < in_dim; ++e) acc += x[e] * w[e * jd + k];
    uh[k] = acc;
  }
}

// c[j] = softmax_j(uh_j . v_sum_j) lane-wise; uniform 1/J when v_sum is null (first pass).
template <typename T>
FASTCAPS_INLINE void couplings(const Vec<T>* uh, const T* v_sum, int64_t J, int64_t D, Vec<T>* c) {
  if (v_sum == nullptr) {
    for (int64_t j = 0; j < J; ++j) c[j] = Vec<T>{} + T(1) / T(J);
    return;
  }
  for (int64_t j = 0; j < J; ++j) {
    Vec<T> logit = {};
    for (int64_t dd = 0; dd < D; ++dd) logit += v_sum[j * D + dd] * uh[j * D + dd];
    c[j] = logit;
  }
  Vec<T> largest = c[0];
  for (int64_t j = 1; j < J; ++j) largest = c[j] > largest ? c[j] : largest;
  Vec<T> total = {};
  for (int64_t j = 0; j < J; ++j) {
    c[j] = exp_nonpositive<T>(c[j] - largest);
    total += c[j];
  }
  const Vec<T> inverse = T(1) / total;
  for (int64_t j = 0; j < J; ++j) c[j] *= inverse;
}

// delta[j] = dL/dlogit_j = c_j (gamma_j - sum_k c_k gamma_k), gamma_j = sigma_j . uh_j: the
// gradient through the couplings (DESIGN.md section 3), lane-wise.
template <typename T>
FASTCAPS_INLINE void logit_gradients(const Vec<T>* uh, const T* sigma, const Vec<T>* c, int64_t J, int64_t D,
                                     Vec<T>* delta) {
  Vec<T> mean = {};
  for (int64_t j = 0; j < J; ++j) {
    Vec<T> gamma = {};
    for (int64_t dd = 0; dd < D; ++dd) gamma += sigma[j * D + dd] * uh[j * D + dd];
    delta[j] = gamma;
    mean += c[j] * gamma;
  }
  for (int64_t j = 0; j < J; ++j) delta[j] = c[j] * (delta[j] - mean);
}

// acc[j*D + d] += weight[j] * uh[j*D + d]
template <typename T>
FASTCAPS_INLINE void accumulate(const Vec<T>* weight, const Vec<T>* uh, int64_t J, int64_t D, Vec<T>* acc) {
  for (int64_t j = 0; j < J; ++j)
    for (int64_t dd = 0; dd < D; ++dd) acc[j * D + dd] += weight[j] * uh[j * D + dd];
}

// One routing pass over one chunk of sample b's capsules, written to partial (jd values):
//   forward  (sigma null):     sum_i c_ij uh_ij, the chunk's share of s_t;
//   backward (sigma not null): sum_i delta_ij uh_ij, its share of dL/dV_{t-1}.
// v_sum is V_{t-1} = v_1 + ... + v_{t-1} (null on the first forward pass: uniform
// couplings). With predict the chunk's u_hat is computed into uh_sample, from chunk_weight
// (the chunk's packed W) or, when that is null, from W's rows; else it is read from uh_sample.
template <typename T>
struct Pass {
  int64_t sample, chunk;
  bool predict;
  const T* v_sum;
  const T* sigma;
};

template <typename T>
void sweep_chunk(const Packed<T>& p, const Pass<T>& pass, const Vec<T>* chunk_weight,
                                 Vec<T>* uh_sample, Scratch<T>& scratch, T* partial) {
  const int64_t J = p.d.out_caps, D = p.d.out_dim, jd = p.jd;
  Vec<T>* sums = scratch.sums.data();
  std::fill(sums, sums + jd, Vec<T>{});
  const int64_t first = pass.chunk * kChunkBlocks, last = std::min(p.blocks, first + kChunkBlocks);
  for (int64_t blk = first; blk < last; ++blk) {
    Vec<T>* uh = uh_sample + blk * jd;
    const Vec<T>* x = p.input_block(pass.sample, blk);
    if (pass.predict && chunk_weight != nullptr)
      predict<T>(x, chunk_weight + (blk - first) * p.block_size(), p.d.in_dim, jd, uh);
    else if (pass.predict)
      predict_from_rows<T>(p, blk, x, uh);
    couplings<T>(uh, pass.v_sum, J, D, scratch.couplings.data());
    if (pass.sigma == nullptr) {
      accumulate<T>(scratch.couplings.data(), uh, J, D, sums);
    } else {
      logit_gradients<T>(uh, pass.sigma, scratch.couplings.data(), J, D, scratch.logit_grads.data());
      accumulate<T>(scratch.logit_grads.data(), uh, J, D, sums);
    }
  }
  for (int64_t k = 0; k < jd; ++k) partial[k] = lane_sum<T>(sums[k]);
}

// Runs `steps` passes for every sample: pass k of sample b sweeps all its chunks
// (pass_of(b, k, chunk) says how), then finish(b, k, partials) combines the chunk partials.
// Two schedules; a sample's arithmetic is the same in both, and whatever the thread count:
// - many samples: parallel over samples, each thread with one u_hat buffer that stays in
//   its cache, reading the shared packed W;
// - few samples: in groups (kGroupBytes of u_hat buffers), each pass parallel over chunks,
//   each chunk walking the group's samples with its W packed once.
// With `kept_u_hat` (B x blocks x jd vectors; the launcher asks for it at small batches,
// kKeepUHatSamples) every sample's u_hat lives there instead of in a scratch
// buffer: the forward leaves it for the backward, whose passes then read it.
template <typename T, typename PassOf, typename Finish>
void run_passes(const Packed<T>& p, int64_t steps, const PassOf& pass_of, const Finish& finish, Vec<T>* kept_u_hat) {
  const int64_t per_sample = p.blocks * p.jd, partials_per_sample = p.chunks * p.jd, B = p.d.batch;
  if (steps == 0 || B == 0) return;
  const auto chunk_weight = [&](Scratch<T>& scratch, int64_t chunk) {
    return scratch.packed_weight(p, chunk * kChunkBlocks, std::min(p.blocks, (chunk + 1) * kChunkBlocks));
  };
  if (p.packed_weight.size() > 0) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      LaneArray<T> uh(kept_u_hat == nullptr ? per_sample : 0);
      std::vector<T> partials(partials_per_sample);
      Scratch<T> scratch(p);
      for (int64_t b = begin; b < end; ++b) {
        Vec<T>* uh_sample = kept_u_hat == nullptr ? uh.data() : kept_u_hat + b * per_sample;
        for (int64_t k = 0; k < steps; ++k) {
          for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
            const Pass<T> pass = pass_of(b, k, chunk);
            sweep_chunk(p, pass, pass.predict ? chunk_weight(scratch, chunk) : nullptr, uh_sample, scratch,
                        partials.data() + chunk * p.jd);
          }
          finish(b, k, partials.data());
        }
      }
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
          const Vec<T>* weight = pass_of(start, k, chunk).predict && !from_rows ? chunk_weight(scratch, chunk) : nullptr;
          for (int64_t b = 0; b < size; ++b)
            sweep_chunk(p, pass_of(start + b, k, chunk), weight, uh + b * per_sample, scratch,
                        partials.data() + (b * p.chunks + chunk) * p.jd);
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
