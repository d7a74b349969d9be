// squash and its backward per output capsule, in the forms that stay finite for every finite
// input (the same forms as fastcaps/kernels/torch/squash.py).

#pragma once

#include "../common/simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

FASTCAPS_KERNELS_BEGIN

// |s| of one capsule, taken on s / max|s_k| so that its squares neither overflow nor underflow.
template <typename T>
T capsule_norm(const T* s, int64_t D) {
  T largest = T(0);
  for (int64_t k = 0; k < D; ++k) largest = std::max(largest, std::abs(s[k]));
  if (largest == T(0)) return T(0);
  T total = T(0);
  for (int64_t k = 0; k < D; ++k) total += (s[k] / largest) * (s[k] / largest);
  return largest * std::sqrt(total);
}

// a = |s| / (1 + |s|^2) written as 1 / (n + 1/n): 0 at n = 0 and at n = inf, never NaN.
template <typename T>
T squash_scale(T norm) {
  return T(1) / (norm + T(1) / norm);
}

// v = squash(s) per output capsule.
template <typename T>
void squash(const T* s, int64_t J, int64_t D, T* v) {
  for (int64_t j = 0; j < J; ++j) {
    const T scale = squash_scale(capsule_norm(s + j * D, D));
    for (int64_t k = 0; k < D; ++k) v[j * D + k] = scale * s[j * D + k];
  }
}

// sigma = J(s) g per output capsule: a (g + (2 / (1 + n^2) - 1) s_hat (s_hat . g)).
template <typename T>
void squash_backward(const T* s, const T* g, int64_t J, int64_t D, T* sigma) {
  for (int64_t j = 0; j < J; ++j) {
    const T* sj = s + j * D;
    const T* gj = g + j * D;
    const T norm = capsule_norm(sj, D);
    const T scale = squash_scale(norm);
    T along = T(0);  // s_hat . g
    if (norm > T(0))
      for (int64_t k = 0; k < D; ++k) along += sj[k] / norm * gj[k];
    const T radial = T(2) / (T(1) + norm * norm) - T(1);
    for (int64_t k = 0; k < D; ++k) {
      const T unit = norm > T(0) ? sj[k] / norm : T(0);
      sigma[j * D + k] = scale * (gj[k] + radial * along * unit);
    }
  }
}

FASTCAPS_KERNELS_END
