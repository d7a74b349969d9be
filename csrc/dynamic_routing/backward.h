// The backward of the C++ dynamic-routing kernels (DESIGN.md section 3): phase A, per sample,
// the r - 1 reverse passes giving sigma_t = dL/ds_t; phase B, per block of input capsules,
// grad u and grad W, from a recomputed u_hat, or from the kept one (small batches).

#pragma once

#include "passes.h"
#include "rows.h"
#include "squash.h"
#include "tuning.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// Per-sample routing state the backward needs: V_{t-1} and sigma_t = dL/ds_t, (B, r, jd) each.
template <typename T>
struct BackwardState {
  int64_t iterations, jd, first;  // first: the first iteration that carries gradient (r - 1 if detached)
  std::vector<T> v_sum, sigma;
  const T* v_sum_at(int64_t b, int64_t t) const { return t == 0 ? nullptr : v_sum.data() + (b * iterations + t) * jd; }
  const T* sigma_at(int64_t b, int64_t t) const { return sigma.data() + (b * iterations + t) * jd; }
};

// Calls f with how many iterations carry gradient as a constant where it is at most 4, else
// with 0 (known at run time only), so that sum_gradient_terms can hold each term's couplings
// in registers.
template <typename F>
FASTCAPS_INLINE void with_gradient_terms(int64_t n, const F& f) {
  if (n <= 4) return with_count_up_to<4>(n, f);
  f(std::integral_constant<int64_t, 0>{});
}

// g[k] = sum over the terms q (iterations state.first + q, in order) of
//   c_q[j] sigma_q[k], plus delta_q[j] V_q[k] for q > 0,
// with k = j*D + d, iteration t's c and delta at c[t * stride + j] and lg[t * stride + j].
// N terms, or (N = 0) iterations - first of them: the per-iteration pointers and, per output
// capsule j, the couplings and logit gradients are taken once, out of the loop over d (a loop
// over t inside it reloaded them for every output, and its dependent adds and branches made
// it 30% of phase B: perf on AVX2, Zen 3).
template <typename T, int64_t N>
FASTCAPS_INLINE void sum_gradient_terms(const BackwardState<T>& state, int64_t b, const Vec<T>* c, const Vec<T>* lg,
                                        int64_t stride, int64_t J, int64_t D, Vec<T>* g) {
  const int64_t first = state.first, count = N > 0 ? N : state.iterations - first;
  constexpr int64_t kHeld = N > 0 ? N : 1;  // terms held in registers
  const T* sigma[kHeld];
  const T* v_sum[kHeld];
  for (int64_t q = 0; q < kHeld; ++q) {
    sigma[q] = state.sigma_at(b, first + q);
    v_sum[q] = q > 0 ? state.v_sum_at(b, first + q) : nullptr;
  }
  for (int64_t j = 0; j < J; ++j) {
    Vec<T> cj[kHeld], lgj[kHeld];
    for (int64_t q = 0; q < kHeld; ++q) {
      cj[q] = c[(first + q) * stride + j];
      lgj[q] = q > 0 ? lg[(first + q) * stride + j] : Vec<T>{};
    }
    for (int64_t dd = 0; dd < D; ++dd) {
      const int64_t k = j * D + dd;
      Vec<T> acc = {};
      acc += cj[0] * sigma[0][k];
      if constexpr (N > 0) {
        for (int64_t q = 1; q < N; ++q) acc += cj[q] * sigma[q][k] + lgj[q] * v_sum[q][k];
      } else {
        for (int64_t t = first + 1; t < first + count; ++t)
          acc += c[t * stride + j] * state.sigma_at(b, t)[k] + lg[t * stride + j] * state.v_sum_at(b, t)[k];
      }
      g[k] = acc;
    }
  }
}

// g = dL/du_hat of sample b for one block of capsules from every iteration's couplings and
// logit gradients (those of iteration t at c + t * stride and lg + t * stride).
template <typename T>
FASTCAPS_INLINE void gradients_from_couplings(const Dims& d, const BackwardState<T>& state, int64_t b, const Vec<T>* c,
                                              const Vec<T>* lg, int64_t stride, Vec<T>* g) {
  with_gradient_terms(d.iterations - state.first, [&](auto terms) __attribute__((always_inline)) {
    sum_gradient_terms<T, terms()>(state, b, c, lg, stride, d.out_caps, d.out_dim, g);
  });
}

// g = dL/du_hat of sample b for one block of capsules (jd vectors), from its u_hat: every
// iteration's couplings and logit gradients first, then
//   g = sum over t of c_j sigma_t + delta_j V_{t-1}  (through s_t, and through the logits of t)
// one output at a time in a register, iterations in order. The first iteration that carries
// gradient goes through s_t only (it is t = 0, whose couplings are uniform, or the only one
// when the routing is detached); every later one through the logits too.
template <typename T>
FASTCAPS_INLINE void prediction_gradients(const Dims& d, const BackwardState<T>& state, int64_t b, const Vec<T>* uh,
                                          Scratch<T>& scratch, Vec<T>* g) {
  const int64_t J = d.out_caps, D = d.out_dim, r = d.iterations;
  Vec<T>* c = scratch.couplings.data();
  Vec<T>* lg = scratch.logit_grads.data();
  for (int64_t t = state.first; t < r; ++t) {
    Vec<T>* ct = c + t * J;
    Vec<T>* lgt = lg + t * J;
    if (t > state.first)
      couplings_and_logit_gradients<T>(&uh, state.v_sum_at(b, t), state.sigma_at(b, t), J, D, d.leaky, &ct, &lgt);
    else
      couplings<T>(&uh, state.v_sum_at(b, t), J, D, d.leaky, &ct);
  }
  gradients_from_couplings(d, state, b, c, lg, J, g);
}

// grad u and grad W of S samples for one block, in one sweep over (e, k):
//   gx[s][e] = sum_k w[e, k] g[s][k], in two partial sums (even and odd k) so that 2S chains
//   run at once; gw[e, k] += x[s][e] g[s][k] for s = 0 .. S-1 in order (the batch order).
// Each vector of w, of grad W and of g is loaded once per (e, k) for both products: as two
// sweeps, g was loaded twice and both were bound by loads (perf on AVX2, Zen 3). Every sum
// is the same, in the same order, as in two sweeps, and a sample's the same whatever S.
template <typename T, int64_t S>
FASTCAPS_INLINE void input_and_weight_gradients(const Vec<T>* w, const Vec<T>* const* x, const Vec<T>* const* g,
                                                int64_t in_dim, int64_t jd, Vec<T>* const* gx, Vec<T>* gw) {
  for (int64_t e = 0; e < in_dim; ++e) {
    const Vec<T>* we = w + e * jd;
    Vec<T>* gwe = gw + e * jd;
    Vec<T> xe[S];
    for (int64_t s = 0; s < S; ++s) xe[s] = x[s][e];
    Vec<T> acc[S][2] = {};
    const auto step = [&](int64_t k, int64_t r) __attribute__((always_inline)) {
      const Vec<T> wk = we[k];
      Vec<T> gwk = gwe[k];
      for (int64_t s = 0; s < S; ++s) {
        const Vec<T> gs = g[s][k];
        acc[s][r] += wk * gs;
        gwk += xe[s] * gs;
      }
      gwe[k] = gwk;
    };
    int64_t k = 0;
    for (; k + 2 <= jd; k += 2) {
      step(k, 0);
      step(k + 1, 1);
    }
    for (; k < jd; ++k) step(k, 0);
    for (int64_t s = 0; s < S; ++s) gx[s][e] = acc[s][0] + acc[s][1];
  }
}

// Phase B for one block of capsules, the batch in order, in tiles of kSampleTile samples:
// g = dL/du_hat (from the kept u_hat if there is one, else recomputed), then grad u = W^T g
// and grad W += u g^T, written in the caller's layouts.
template <typename T>
void gradient_block(const Packed<T>& p, const BackwardState<T>& state, const Vec<T>* kept_u_hat, int64_t blk,
                    Scratch<T>& scratch, T* grad_u, T* grad_weight) {
  const Dims& d = p.d;
  const int64_t Din = d.in_dim, jd = p.jd;
  const Vec<T>* w = scratch.packed_weight(p, blk, blk + 1);  // read for every sample of the batch
  Vec<T>* gw = scratch.weight_grad.data();
  std::fill(gw, gw + Din * jd, Vec<T>{});
  for (int64_t b0 = 0; b0 < d.batch; b0 += kSampleTile) {
    const int64_t n = std::min(kSampleTile, d.batch - b0);
    const Vec<T>* x[kSampleTile];
    const Vec<T>* uh[kSampleTile];
    Vec<T>* predicted[kSampleTile];
    Vec<T>* g[kSampleTile];
    Vec<T>* gx[kSampleTile];
    for (int64_t s = 0; s < n; ++s) {
      x[s] = p.input_block(b0 + s, blk);
      predicted[s] = scratch.row.data() + s * jd;
      uh[s] = kept_u_hat != nullptr ? kept_u_hat + ((b0 + s) * p.blocks + blk) * jd : predicted[s];
      g[s] = scratch.row_grad.data() + s * jd;
      gx[s] = scratch.input_grad.data() + s * Din;
    }
    with_tile_size(n, [&](auto S) __attribute__((always_inline)) {
      if (kept_u_hat == nullptr) predict<T, S()>(x, w, Din, jd, predicted);
      for (int64_t s = 0; s < n; ++s) prediction_gradients(d, state, b0 + s, uh[s], scratch, g[s]);
      input_and_weight_gradients<T, S()>(w, x, g, Din, jd, gx, gw);
    });
    for (int64_t s = 0; s < n; ++s) unpack_input_block(d, gx[s], b0 + s, blk, grad_u);
  }
  unpack_weight_block(d, p.offset.data(), gw, blk, grad_weight);
}

// Phase B for one block when the forward kept u_hat (small batches): g for every sample
// from the kept u_hat, turned capsule-major, then per output capsule j and capsule i,
// straight from W in its own layout:
//   grad W[j, i] = sum_b g[b, i, j] u[b, i]^T (batch order), grad u[b, i] += W[j, i]^T g[b, i, j].
// W and grad W are read and written in order with no transpose: at these batches moving W is
// most of the call. Where Din is a power of two that is done a vector at a time
// (gradient_rows); otherwise a value at a time, the block's run of W[j] for each j in turn.
// capsule_grads holds B * kLanes * jd values and kLanes of padding.
template <typename T>
void gradient_block_from_kept(const Packed<T>& p, const BackwardState<T>& state,
                                              const Vec<T>* kept_u_hat, const T* u, int64_t blk,
                                              Scratch<T>& scratch, T* capsule_grads, T* grad_u, T* grad_weight) {
  const Dims& d = p.d;
  const int64_t L = kLanes<T>, I = d.in_caps, Din = d.in_dim, J = d.out_caps, D = d.out_dim, jd = p.jd;
  const int64_t used = std::min(L, I - blk * L);
  Vec<T>* g = scratch.row_grad.data();
  for (int64_t b = 0; b < d.batch; ++b) {
    prediction_gradients(d, state, b, kept_u_hat + (b * p.blocks + blk) * jd, scratch, g);
    unpack_lanes(g, jd, used, capsule_grads + b * L * jd, jd);  // capsule l's g at row b * L + l
  }
  for (int64_t b = 0; b < d.batch; ++b)
    std::fill(grad_u + (b * I + blk * L) * Din, grad_u + (b * I + blk * L + used) * Din, T(0));
  if (!p.row_outputs.empty()) {  // Din a power of two: by rows, as the forward predicted
    with_segment_length<T>(Din, [&](auto segment) __attribute__((always_inline)) {
      gradient_rows<T, segment()>(d, p.weight, u, capsule_grads, blk, grad_u, grad_weight);
    });
    return;
  }
  // j outermost: the block's capsules of W[j] (and of grad W[j]) are one contiguous run.
  for (int64_t j = 0; j < J; ++j) {
    if (j + 1 < J) prefetch(p.weight + ((j + 1) * I + blk * L) * D * Din, used * D * Din);
    for (int64_t l = 0; l < used; ++l) {
      const int64_t i = blk * L + l;
      const T* w = p.weight + (j * I + i) * D * Din;
      T* gw = grad_weight + (j * I + i) * D * Din;
      for (int64_t b = 0; b < d.batch; ++b) {
        const T* g_bij = capsule_grads + (b * L + l) * jd + j * D;
        const T* x = u + (b * I + i) * Din;
        T* gu = grad_u + (b * I + i) * Din;
        for (int64_t dd = 0; dd < D; ++dd) {
          const T gd = g_bij[dd];
          const T* wd = w + dd * Din;
          T* gwd = gw + dd * Din;
          for (int64_t e = 0; e < Din; ++e) gu[e] += gd * wd[e];
          if (b == 0)
            for (int64_t e = 0; e < Din; ++e) gwd[e] = gd * x[e];
          else
            for (int64_t e = 0; e < Din; ++e) gwd[e] += gd * x[e];
        }
      }
    }
  }
}

// The prologue of every backward: V_{t-1} as the forward built it (same squash, same order:
// bitwise the same), and sigma_{r-1} from grad v.
template <typename T>
BackwardState<T> backward_prologue(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach_routing) {
  const Dims& d = p.d;
  const int64_t B = d.batch, J = d.out_caps, D = d.out_dim, jd = p.jd, r = d.iterations;
  BackwardState<T> state{r, jd, detach_routing ? r - 1 : 0, std::vector<T>(B * r * jd, T(0)),
                         std::vector<T>(B * r * jd, T(0))};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> v(jd);
    for (int64_t b = begin; b < end; ++b) {
      const T* s_b = s_all + b * r * jd;
      for (int64_t t = 1; t < r; ++t) {
        squash(s_b + (t - 1) * jd, J, D, v.data());
        T* v_sum = state.v_sum.data() + (b * r + t) * jd;  // V_{t-1} = V_{t-2} + v_{t-1}
        const T* before = v_sum - jd;                         // V_{t-2}, all zeros at t = 1
        for (int64_t k = 0; k < jd; ++k) v_sum[k] = before[k] + v[k];
      }
      squash_backward(s_b + (r - 1) * jd, grad_v + b * jd, J, D, state.sigma.data() + (b * r + r - 1) * jd);
    }
  });
  return state;
}

// Phase A's passes, for run_passes or tile_passes: pass k runs backward through iteration
// t = r-1-k, giving G = dL/dV_{t-1}; then dL/dv_{t-1} = the sum of the G so far, and
// sigma_{t-1} from it. Each sample's finish writes that sample's state only.
template <typename T>
struct ReversePasses {
  const Packed<T>& p;
  BackwardState<T>& state;
  const T* s_all;
  bool predict;                 // the first pass computes u_hat (none kept)
  std::vector<T> grad_v_sum;    // per sample, the G so far

  ReversePasses(const Packed<T>& packed, BackwardState<T>& backward_state, const T* s, bool predict_first)
      : p(packed), state(backward_state), s_all(s), predict(predict_first), grad_v_sum(p.d.batch * p.jd, T(0)) {}
  int64_t steps() const { return p.d.iterations - 1 - state.first; }  // none when detached
  Pass<T> pass(int64_t b, int64_t k, int64_t chunk) const {
    const int64_t t = p.d.iterations - 1 - k;
    return Pass<T>{b, chunk, k == 0 && predict, state.v_sum_at(b, t), state.sigma_at(b, t)};
  }
  void finish(int64_t b, int64_t k, const T* partials) {
    const int64_t r = p.d.iterations, t = r - 1 - k, jd = p.jd;
    std::vector<T> grad_v_sum_t(jd);
    sum_chunks(partials, p.chunks, jd, grad_v_sum_t.data());
    T* total = grad_v_sum.data() + b * jd;
    for (int64_t q = 0; q < jd; ++q) total[q] += grad_v_sum_t[q];
    squash_backward(s_all + (b * r + t - 1) * jd, total, p.d.out_caps, p.d.out_dim,
                    state.sigma.data() + (b * r + t - 1) * jd);
  }
};

// grad bias: every sigma_t that carries gradient, summed in a fixed order.
template <typename T>
void bias_gradient(const BackwardState<T>& state, int64_t batch, T* grad_bias) {
  std::fill(grad_bias, grad_bias + state.jd, T(0));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = state.first; t < state.iterations; ++t)
      for (int64_t k = 0; k < state.jd; ++k) grad_bias[k] += state.sigma_at(b, t)[k];
}

// The prologue, phase A (sigma_t for t < r) and grad bias, with phase A parallel as run_passes
// schedules it: the dense backward's first part. With kept_u_hat the passes read it, else they
// recompute u_hat.
template <typename T>
BackwardState<T> routing_state_backward(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach_routing,
                                        const Vec<T>* kept_u_hat, T* grad_bias) {
  BackwardState<T> state = backward_prologue(p, grad_v, s_all, detach_routing);
  ReversePasses<T> phase_a(p, state, s_all, kept_u_hat == nullptr);
  // Reads the kept u_hat when there is one (run_passes writes only where it predicts).
  run_passes(
      p, phase_a.steps(), [&](int64_t b, int64_t k, int64_t chunk) { return phase_a.pass(b, k, chunk); },
      [&](int64_t b, int64_t k, const T* partials) { phase_a.finish(b, k, partials); },
      const_cast<Vec<T>*>(kept_u_hat));
  bias_gradient(state, p.d.batch, grad_bias);
  return state;
}

template <typename T>
void backward_kernel(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach_routing, const Vec<T>* kept_u_hat,
                     const T* u, T* grad_u, T* grad_weight, T* grad_bias) {
  const int64_t B = p.d.batch, jd = p.jd;
  const BackwardState<T> state = routing_state_backward(p, grad_v, s_all, detach_routing, kept_u_hat, grad_bias);

  // Phase B: each block owned by one thread, so grad W is summed over the batch in order.
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(p);
    if (kept_u_hat == nullptr || B > kNativeGradientSamples) {
      for (int64_t blk = begin; blk < end; ++blk)
        gradient_block(p, state, kept_u_hat, blk, scratch, grad_u, grad_weight);
      return;
    }
    std::vector<T> capsule_grads(B * kLanes<T> * jd + kLanes<T>);  // padded for expand_segments
    for (int64_t blk = begin; blk < end; ++blk)
      gradient_block_from_kept(p, state, kept_u_hat, u, blk, scratch, capsule_grads.data(), grad_u, grad_weight);
  });
}

FASTCAPS_KERNELS_END
