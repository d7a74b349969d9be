// The forward of the C++ dynamic-routing kernels: r passes per sample, each summing
// c_ij * u_hat_ij, with V_{t-1} (the sum of the outputs so far) as the routing state.

#pragma once

#include "passes.h"
#include "squash.h"

#include <cstdint>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// The first pass computes u_hat (into kept_u_hat when there is one; from the votes for
// route_votes, Packed::votes) and the later passes read it.
template <typename T>
void forward_kernel(const Packed<T>& p, const T* bias, T* v_out, T* s_out, Vec<T>* kept_u_hat) {
  const Dims& d = p.d;
  const int64_t jd = p.jd, r = d.iterations;
  std::vector<T> v_sum(d.batch * jd, T(0));  // V_{t-1} per sample
  auto pass_of = [&](int64_t b, int64_t t, int64_t chunk) {
    return Pass<T>{b, chunk, t == 0, t == 0 ? nullptr : v_sum.data() + b * jd, nullptr};
  };
  auto finish = [&](int64_t b, int64_t t, const T* partials) {
    T* s = s_out + (b * r + t) * jd;
    T* v = v_out + b * jd;
    sum_chunks(partials, p.chunks, jd, s);
    if (bias != nullptr)
      for (int64_t k = 0; k < jd; ++k) s[k] += bias[k];
    squash(s, d.out_caps, d.out_dim, v);
    for (int64_t k = 0; k < jd; ++k) v_sum[b * jd + k] += v[k];
  };
  run_passes(p, r, pass_of, finish, kept_u_hat);
}

FASTCAPS_KERNELS_END
