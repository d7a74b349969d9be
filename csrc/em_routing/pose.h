// A P x P pose (a vote, a parent's mu or sigma^2, a gradient of one) as one vector of P^2 lanes,
// padded to a power of two (16 lanes for the paper's 4x4: one AVX-512 register of floats, two
// AVX2, four SSE2; GCC splits a wider vector into the build's native width). The EM kernels
// do every per-vote operation on these, and the matrix products of a vote (M W, and their
// adjoints) as P multiply-adds of lane-permuted poses, the permutations fixed at compile time.
// Padded lanes hold 0 in every pose loaded from memory and stay 0 through products; sums over
// a pose's entries mask them (`entry_sum`).

#pragma once

#include "../common/simd.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

FASTCAPS_KERNELS_BEGIN

constexpr int64_t pose_lanes(int64_t entries) {
  int64_t lanes = 2;
  while (lanes < entries) lanes *= 2;
  return lanes;
}

template <typename T, int64_t P>
struct Pose {
  static constexpr int64_t side = P;
  static constexpr int64_t entries = P * P;
  static constexpr int64_t lanes = pose_lanes(entries);
  typedef T vec __attribute__((vector_size(lanes * sizeof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index;
  typedef index ivec __attribute__((vector_size(lanes * sizeof(index))));

  // A pose from P * P values (padded lanes 0), and back.
  static FASTCAPS_INLINE vec load(const T* src) {
    vec v = {};
    if constexpr (entries == lanes)
      std::memcpy(&v, src, sizeof(vec));
    else
      for (int64_t h = 0; h < entries; ++h) v[h] = src[h];
    return v;
  }
  static FASTCAPS_INLINE void store(T* dst, const vec& v) {
    if constexpr (entries == lanes)
      std::memcpy(dst, &v, sizeof(vec));
    else
      for (int64_t h = 0; h < entries; ++h) dst[h] = v[h];
  }
  static FASTCAPS_INLINE vec splat(T x) {
    vec v = {};
    return v + x;
  }

  // Lane l of the result is lane Map::at(l) of v.
  template <typename Map, std::size_t... l>
  static FASTCAPS_INLINE vec permute(const vec& v, std::index_sequence<l...>) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, Map::at(l)...);
#else
    return __builtin_shuffle(v, ivec{static_cast<index>(Map::at(l))...});
#endif
  }
  template <typename Map>
  static FASTCAPS_INLINE vec permute(const vec& v) {
    return permute<Map>(v, std::make_index_sequence<lanes>{});
  }

  // Entry (a, d) of the result, lane a * P + d, is entry (a, b) of v: column b across each row.
  template <int64_t b>
  struct Column {
    static constexpr int64_t at(int64_t l) { return l < entries ? (l / P) * P + b : l; }
  };
  // Entry (a, d) of the result is entry (b, d) of v: row b repeated down the rows.
  template <int64_t b>
  struct Row {
    static constexpr int64_t at(int64_t l) { return l < entries ? b * P + l % P : l; }
  };
  // Entry (a, b) of the result is entry (b, d) of v: column d of v laid along each row.
  template <int64_t d>
  struct Transposed {
    static constexpr int64_t at(int64_t l) { return l < entries ? (l % P) * P + d : l; }
  };
  // Entry (b, d) of the result is entry (a, b) of v: row a laid down each column.
  template <int64_t a>
  struct RowAsColumn {
    static constexpr int64_t at(int64_t l) { return l < entries ? a * P + l / P : l; }
  };
  template <int64_t step>
  struct Butterfly {
    static constexpr int64_t at(int64_t l) { return l ^ step; }
  };

  // f(std::integral_constant<int64_t, k>) for k = 0 .. P - 1, unrolled.
  template <typename F, std::size_t... k>
  static FASTCAPS_INLINE void for_each_index(const F& f, std::index_sequence<k...>) {
    (f(std::integral_constant<int64_t, int64_t(k)>{}), ...);
  }
  template <typename F>
  static FASTCAPS_INLINE void for_each_index(const F& f) {
    for_each_index(f, std::make_index_sequence<P>{});
  }

  // x's part of the products below, formed once for every y it multiplies: P permutations. (A
  // plain array: a vector typedef as a template argument, std::array<vec, P>, loses its vector
  // attribute.)
  struct Factors {
    vec part[P];
    FASTCAPS_INLINE vec& operator[](int64_t k) { return part[k]; }
    FASTCAPS_INLINE const vec& operator[](int64_t k) const { return part[k]; }
  };
  // For x y: x's column b spread along each row (entry (a, d) = x[a, b]).
  static FASTCAPS_INLINE Factors columns(const vec& x) {
    Factors f;
    for_each_index([&](auto b) { f[b] = permute<Column<b>>(x); });
    return f;
  }
  // For x^T y: x's row a laid down each column (entry (b, d) = x[a, b]).
  static FASTCAPS_INLINE Factors rows_as_columns(const vec& x) {
    Factors f;
    for_each_index([&](auto a) { f[a] = permute<RowAsColumn<a>>(x); });
    return f;
  }

  // acc + x y, entry (a, d) = sum_b x[a, b] y[b, d], x given by columns(x): P multiply-adds of
  // those and y's rows repeated down.
  static FASTCAPS_INLINE vec multiply_add(const Factors& x, const vec& y, vec acc) {
    for_each_index([&](auto b) { acc += x[b] * permute<Row<b>>(y); });
    return acc;
  }
  // acc + x^T y, entry (b, d) = sum_a x[a, b] y[a, d], x given by rows_as_columns(x).
  static FASTCAPS_INLINE vec transpose_multiply_add(const Factors& x, const vec& y, vec acc) {
    for_each_index([&](auto a) { acc += x[a] * permute<Row<a>>(y); });
    return acc;
  }
  // acc + x y^T, entry (a, b) = sum_d x[a, d] y[b, d].
  static FASTCAPS_INLINE vec multiply_transpose_add(const vec& x, const vec& y, vec acc) {
    for_each_index([&](auto d) { acc += permute<Column<d>>(x) * permute<Transposed<d>>(y); });
    return acc;
  }

  // The sum of a pose's P * P entries, in one fixed order (butterflies over the lanes).
  static FASTCAPS_INLINE T entry_sum(vec v) {
    if constexpr (entries < lanes) {
      for (int64_t h = entries; h < lanes; ++h) v[h] = T(0);
    }
    sum_butterflies<lanes / 2>(v);
    return v[0];
  }
  template <int64_t step>
  static FASTCAPS_INLINE void sum_butterflies(vec& v) {
    v += permute<Butterfly<step>>(v);
    if constexpr (step > 1) sum_butterflies<step / 2>(v);
  }
};

FASTCAPS_KERNELS_END
