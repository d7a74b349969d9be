// u_hat and its gradients from W's rows, for a W that serves one sample (B = 1), where
// packing W into the lane layout costs more than everything else in the call. Needs Din a
// power of two of at most one vector (predicts_from_rows); other shapes pack W.

#pragma once

#include "layout.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// --- u_hat from W's rows -------------------------------------------------------------------
// For a W that serves one sample (B = 1), packing it costs more than everything else in the
// call. Instead each row W[j, i] (D x Din, contiguous) is read in order as vectors,
// multiplied lane-wise by u[i] repeated, and the sums over each d's Din consecutive values
// are taken by a butterfly over the vectors (reduce_segments): the vector for capsule i
// then holds u_hat[i, j, d] for kLanes values of d, and a transpose over the block's
// capsules puts them in the lane layout. The butterfly needs Din to be a power of two of at
// most kLanes (predicts_from_rows); other shapes pack W.

template <typename T>
bool predicts_from_rows(const Dims& d) {
  return d.in_dim >= 1 && d.in_dim <= kLanes<T> && (d.in_dim & (d.in_dim - 1)) == 0;
}

// Lanes of one butterfly stage on segments of g lanes: lane o of the result takes, from
// segment o / g of the first (o % g < g/2) or second vector, its first (half = false) or
// second half's lane o % (g/2). The two shuffles added give both vectors' half-sums.
template <typename T, int64_t g, bool second_half>
struct HalvingLanes {
  static constexpr int64_t at(int64_t o) {
    constexpr int64_t L = kLanes<T>, h = g / 2;
    return (o % g < h ? 0 : L) + (o / g) * g + o % h + (second_half ? h : 0);
  }
};

// v[0..g) hold segments of g lanes; returns one vector of every segment's sum (which lane
// holds which segment: row_lane_outputs). Each stage halves both the segment length and the
// number of vectors.
template <typename T, int64_t g>
FASTCAPS_INLINE Vec<T> reduce_segments(Vec<T>* v) {
  if constexpr (g == 1) {
    return v[0];
  } else {
    for (int64_t k = 0; k < g / 2; ++k)
      v[k] = shuffle<T, HalvingLanes<T, g, false>>(v[k], v[k + g / 2]) +
             shuffle<T, HalvingLanes<T, g, true>>(v[k], v[k + g / 2]);
    return reduce_segments<T, g / 2>(v);
  }
}

// Vectors of one row W[j, i] (D * Din values, the last one zero-padded), and the reduced
// vectors they give: g = Din of them each.
inline int64_t row_vectors(const Dims& d, int64_t lanes) { return (d.out_dim * d.in_dim + lanes - 1) / lanes; }
inline int64_t reduced_vectors(const Dims& d, int64_t lanes) { return (row_vectors(d, lanes) + d.in_dim - 1) / d.in_dim; }

// Row vector k of W[j, i] (its values [k * L, k * L + L), zero past the row's end).
template <typename T>
FASTCAPS_INLINE Vec<T> load_row_vector(const T* row, int64_t length, int64_t k) {
  const int64_t start = k * kLanes<T>;
  Vec<T> out = {};
  if (start + kLanes<T> <= length)
    std::memcpy(&out, row + start, sizeof(Vec<T>));
  else if (start < length)
    std::memcpy(&out, row + start, (length - start) * sizeof(T));
  return out;
}

// The d whose sum lane q of reduced vector f holds, at [f * L + q], or -1 for padding: found
// by running the butterfly on a row that holds d + 1 at e = 0 and zeros elsewhere.
template <typename T, int64_t g>
std::vector<int64_t> butterfly_lane_outputs(const Dims& d) {
  const int64_t L = kLanes<T>, length = d.out_dim * d.in_dim, reduced = reduced_vectors(d, L);
  std::vector<T> row(length, T(0));
  for (int64_t dd = 0; dd < d.out_dim; ++dd) row[dd * d.in_dim] = T(dd + 1);
  std::vector<int64_t> out(reduced * L);
  Vec<T> v[g];
  for (int64_t f = 0; f < reduced; ++f) {
    for (int64_t k = 0; k < g; ++k) v[k] = load_row_vector(row.data(), length, f * g + k);
    const Vec<T> sums = reduce_segments<T, g>(v);
    for (int64_t q = 0; q < L; ++q) out[f * L + q] = static_cast<int64_t>(sums[q]) - 1;
  }
  // Every d in exactly one lane: predict_rows writes u_hat by this table.
  std::vector<int64_t> found(d.out_dim, 0);
  for (const int64_t dd : out) {
    TORCH_INTERNAL_ASSERT(dd >= -1 && dd < d.out_dim, "routing_cpu: butterfly lane of output ", dd);
    if (dd >= 0) ++found[dd];
  }
  TORCH_INTERNAL_ASSERT(std::all_of(found.begin(), found.end(), [](int64_t n) { return n == 1; }));
  return out;
}

template <int64_t g>
using SegmentLength = std::integral_constant<int64_t, g>;

// Calls f(SegmentLength<Din>{}): g = Din as a compile-time constant (predicts_from_rows),
// instantiated only for the powers of two up to kLanes.
template <typename T, int64_t g = kLanes<T>, typename F>
FASTCAPS_INLINE auto with_segment_length(int64_t in_dim, const F& f) {
  if constexpr (g == 1) {
    TORCH_INTERNAL_ASSERT(in_dim == 1, "routing_cpu: no row prediction for in_dim ", in_dim);
    return f(SegmentLength<1>{});
  } else {
    if (in_dim == g) return f(SegmentLength<g>{});
    return with_segment_length<T, g / 2>(in_dim, f);
  }
}

template <typename T>
std::vector<int64_t> row_lane_outputs(const Dims& d) {
  if (!predicts_from_rows<T>(d)) return {};
  return with_segment_length<T>(d.in_dim, [&](auto g) { return butterfly_lane_outputs<T, g()>(d); });
}

template <typename T, int64_t g>
FASTCAPS_INLINE void predict_rows(const Dims& d, const int64_t* lane_outputs, const T* weight, int64_t blk,
                                  const Vec<T>* x, Vec<T>* uh) {
  const int64_t L = kLanes<T>, D = d.out_dim, length = D * g, used = std::min(L, d.in_caps - blk * L);
  const int64_t reduced = reduced_vectors(d, L);
  Vec<T> repeated[kLanes<T>];  // u[i] repeated over the lanes: lane q holds e = q % g
  for (int64_t l = 0; l < used; ++l)
    for (int64_t q = 0; q < L; ++q) repeated[l][q] = x[q % g][l];
  Vec<T> tile[kLanes<T>], products[g];
  for (int64_t j = 0; j < d.out_caps; ++j) {
    const T* run = weight + (j * d.in_caps + blk * L) * length;  // the block's rows of W[j], in order
    for (int64_t f = 0; f < reduced; ++f) {
      for (int64_t l = 0; l < L; ++l) {
        if (l >= used) {
          tile[l] = Vec<T>{};
          continue;
        }
        if (f == 0 && j + 1 < d.out_caps) prefetch(run + (d.in_caps + l) * length, length);  // W[j + 1, i]
        for (int64_t k = 0; k < g; ++k) products[k] = load_row_vector(run + l * length, length, f * g + k) * repeated[l];
        tile[l] = reduce_segments<T, g>(products);
      }
      transpose<T>(tile);
      for (int64_t q = 0; q < L; ++q)
        if (lane_outputs[f * L + q] >= 0) uh[j * D + lane_outputs[f * L + q]] = tile[q];
    }
  }
}

template <typename T>
void predict_from_rows(const Packed<T>& p, int64_t blk, const Vec<T>* x, Vec<T>* uh) {
  // Forced inline, as the helpers are: a lambda is otherwise compiled once, for baseline x86-64.
  with_segment_length<T>(p.d.in_dim, [&](auto g) __attribute__((always_inline)) {
    predict_rows<T, g()>(p.d, p.row_outputs.data(), p.weight, blk, x, uh);
  });
}

// Lane q of expand_segments' result takes value q / g: each of L / g values repeated g times.
template <int64_t g>
struct ExpandLanes {
  static constexpr int64_t at(int64_t q) { return q / g; }
};
template <typename T, int64_t g, std::size_t... lane>
constexpr typename Simd<T>::ivec expand_indices(std::index_sequence<lane...>) {
  return typename Simd<T>::ivec{static_cast<typename Simd<T>::integer>(ExpandLanes<g>::at(lane))...};
}

// values[0 .. L/g) with each one repeated g times, the values past count zero. For row
// vector k of a D x g matrix W[j, i], with grads the D gradients dL/du_hat[i, j, d], values =
// grads + k * L / g and count = D - k * L / g give grads[d] lined up with the lanes (d, e). Reads a whole vector from values (the caller's buffer has
// kLanes values of padding): building a partial one goes through the stack and stalls the
// shuffle that reads it.
template <typename T, int64_t g>
FASTCAPS_INLINE Vec<T> expand_segments(const T* values, int64_t count) {
  constexpr auto lanes = std::make_index_sequence<kLanes<T>>{};
  constexpr typename Simd<T>::ivec expand = expand_indices<T, g>(lanes);
  Vec<T> loaded;
  std::memcpy(&loaded, values, sizeof(Vec<T>));
  const Vec<T> expanded = shuffle<T, ExpandLanes<g>>(loaded, loaded);
  if (count >= kLanes<T> / g) return expanded;
  return expand < static_cast<typename Simd<T>::integer>(count) ? expanded : Vec<T>{};
}

// Stores row vector k of a row of `length` values (the inverse of load_row_vector).
template <typename T>
FASTCAPS_INLINE void store_row_vector(const Vec<T>& v, int64_t length, int64_t k, T* row) {
  const int64_t start = k * kLanes<T>;
  if (start + kLanes<T> <= length)
    std::memcpy(row + start, &v, sizeof(Vec<T>));
  else
    for (int64_t c = start; c < length; ++c) row[c] = v[c - start];
}

// Phase B's products for one block, from W's rows (Din = g, a power of two, as
// predict_rows): lane q of row vector k of W[j, i] is (d, e) = (k * L / g + q / g, q % g), so
// with G = g[b, i, j] expanded (expand_segments) and X = u[b, i] repeated over the lanes,
//   grad W[j, i] row vector k = sum_b G * X  (batch order)
//   grad u[b, i][e] = sum over j, k and lanes q with q % g = e of G * (W[j, i] row vector k).
// One capsule at a time, j inside: the J rows of W[., i] are J streams read in order.
// capsule_grads as in gradient_block_from_kept; grad_u's block is zero on entry.
template <typename T, int64_t g>
FASTCAPS_INLINE void gradient_rows(const Dims& d, const T* weight, const T* u, const T* capsule_grads, int64_t blk,
                                   T* grad_u, T* grad_weight) {
  const int64_t L = kLanes<T>, I = d.in_caps, D = d.out_dim, jd = d.jd(), length = D * g;
  const int64_t vectors = row_vectors(d, L), used = std::min(L, I - blk * L);
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t i = blk * L; i < blk * L + used; ++i) {
      Vec<T> repeated;  // u[b, i] over the lanes: lane q holds e = q % g
      for (int64_t q = 0; q < L; ++q) repeated[q] = u[(b * I + i) * g + q % g];
      const T* grads = capsule_grads + (b * L + i - blk * L) * jd;
      Vec<T> products = {};
      for (int64_t j = 0; j < d.out_caps; ++j) {
        const T* w = weight + (j * I + i) * length;
        T* gw = grad_weight + (j * I + i) * length;
        for (int64_t k = 0; k < vectors; ++k) {
          __builtin_prefetch(w + length + k * L);  // W[j, i + 1]: each of the J streams one row ahead
          const Vec<T> expanded = expand_segments<T, g>(grads + j * D + k * (L / g), D - k * (L / g));
          products += expanded * load_row_vector(w, length, k);
          const Vec<T> grad_w = expanded * repeated;
          store_row_vector(b == 0 ? grad_w : load_row_vector(gw, length, k) + grad_w, length, k, gw);
        }
      }
      T* gu = grad_u + (b * I + i) * g;
      for (int64_t q = 0; q < L; ++q) gu[q % g] += products[q];
    }
}

FASTCAPS_KERNELS_END
