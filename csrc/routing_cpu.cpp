// Fused CPU routing kernels: DESIGN.md sections 2-3 without materializing u_hat for the batch.
//
// Schemas are defined in Python (fastcaps/_routing_cpu.py); this file implements them for
// the CPU dispatch key. Arguments (all contiguous):
//   u       (B, I, Din)
//   weight  (J, I, D, Din)   the DigitCaps layout
//   bias    (J, D) or an empty tensor
//   s       (B, r, J, D)     each iteration's pre-squash sum, saved for the backward
//
// SIMD across input capsules. Capsules are taken in blocks of kLanes (64 bytes of T: 16
// floats or 8 doubles; the last block is zero-padded), and every per-capsule quantity of a
// block is one vector whose lane l belongs to capsule block * kLanes + l. u_hat for a block
// is then jd = J*D vectors, and the logits, softmax, coupling gradients and sums over
// capsules are all lane-wise arithmetic: no horizontal sums in the inner loops, for any J
// and D. u is repacked to this layout once per call (pack); W once per call when samples
// run in parallel, else per chunk or block where it is used (pack_weight_block), except
// where it serves one sample: then u_hat is taken from W's rows (predict_from_rows).
//
// Forward: r passes per sample, each a sweep over the blocks that sums c_ij * u_hat_ij; the
// first pass computes u_hat into a per-sample buffer (blocks x jd vectors) that later
// passes read. Backward phase A, per sample: the r - 1 reverse passes giving
// sigma_t = dL/ds_t. Phase B, parallel over blocks, each walking the batch in order:
// recomputes u_hat and the couplings and accumulates grad u and grad W. At small batches
// the forward's u_hat buffers are kept for the backward (`kept`), which then reads them
// instead of recomputing u_hat and takes grad u and grad W from W in its own layout.
//
// Determinism: sums over capsules are taken per chunk of kChunkBlocks blocks and the chunk
// partials added in chunk order, and grad W is summed over the batch in batch order by the
// one thread that owns a block, so results are bitwise identical for any thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The hot functions are compiled three times, for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64, and the dynamic loader picks the best one the machine
// runs (GCC function multi-versioning). The build itself stays portable: no -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTCAPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCAPS_CLONES
#endif
// Helpers are forced inline so that each clone compiles them for its own instruction set.
#define FASTCAPS_INLINE inline __attribute__((always_inline))

namespace fastcaps {
namespace {

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(64)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> integer;
  typedef integer ivec __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};
template <typename T>
using Vec = typename Simd<T>::vec;
template <typename T>
constexpr int64_t kLanes = Simd<T>::lanes;

// Capsule sums are combined per chunk of this many blocks (64 MNIST capsules in float32):
// the unit of work when few samples are split across threads.
constexpr int64_t kChunkBlocks = 4;

// 1/k! for k <= degree, computed at compile time.
template <typename T, int degree>
constexpr std::array<T, degree + 1> inverse_factorials() {
  std::array<T, degree + 1> out{};
  out[0] = T(1);
  for (int k = 1; k <= degree; ++k) out[k] = out[k - 1] / T(k);
  return out;
}

// exp(x) for x <= 0 (a logit minus the row's largest), lane-wise: 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] and p its Taylor polynomial, degree 7 for float
// (error 5e-9 relative) and 13 for double (4e-18). NaN stays NaN.
template <typename T>
FASTCAPS_INLINE Vec<T> exp_nonpositive(Vec<T> x) {
  using IVec = typename Simd<T>::ivec;
  constexpr bool single = sizeof(T) == 4;
  constexpr int degree = single ? 7 : 13;
  constexpr int mantissa_bits = single ? 23 : 52;
  constexpr typename Simd<T>::integer exponent_bias = single ? 127 : 1023;
  // Below this, exp underflows; clamping keeps 2^n a normal number (the error, ~1e-38 or
  // ~1e-308 absolute, is below anything a softmax of largest term 1 can resolve).
  const T lowest = single ? T(-87) : T(-708);
  const T round_magic = single ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^mantissa_bits
  const T log2e = T(1.4426950408889634), ln2_hi = T(0.693145751953125), ln2_lo = T(1.428606765330187e-06);
  x = x < lowest ? lowest : x;
  const Vec<T> n = (x * log2e + round_magic) - round_magic;  // round to nearest
  const Vec<T> r = (x - n * ln2_hi) - n * ln2_lo;
  constexpr std::array<T, degree + 1> inverse_factorial = inverse_factorials<T, degree>();
  Vec<T> p = r * inverse_factorial[degree] + inverse_factorial[degree - 1];
  for (int k = degree - 2; k >= 0; --k) p = p * r + inverse_factorial[k];
  const IVec exponent = (__builtin_convertvector(n, IVec) + exponent_bias) << mantissa_bits;
  return p * (Vec<T>)exponent;  // a vector cast reinterprets the bits
}

// n vectors, 64-byte aligned (std::vector<Vec<T>> drops the vector type's alignment, and
// aligned vector loads of misaligned memory fault). Not initialized: users write before reading.
template <typename T>
class LaneArray {
 public:
  explicit LaneArray(int64_t n = 0) : size_(n), memory_(std::aligned_alloc(64, std::max<int64_t>(n, 1) * 64)) {
    TORCH_CHECK(memory_ != nullptr, "routing_cpu: out of memory allocating ", n * 64, " bytes");
  }
  Vec<T>* data() const { return static_cast<Vec<T>*>(memory_.get()); }
  int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(void* memory) const { std::free(memory); }
  };
  int64_t size_;
  std::unique_ptr<void, Free> memory_;
};

template <typename T>
FASTCAPS_INLINE T lane_sum(const Vec<T>& v) {
  T total = T(0);
  for (int64_t l = 0; l < kLanes<T>; ++l) total += v[l];
  return total;
}

struct Dims {
  int64_t batch, in_caps, in_dim, out_caps, out_dim, iterations;
  int64_t jd() const { return out_caps * out_dim; }
  template <typename T>
  int64_t blocks() const { return (in_caps + kLanes<T> - 1) / kLanes<T>; }
  template <typename T>
  int64_t chunks() const { return (blocks<T>() + kChunkBlocks - 1) / kChunkBlocks; }
};

// u_hat buffers are held for a group of samples at a time, at most this many bytes (11
// MNIST samples in float32): each chunk's W is then packed once per group, and memory stays
// bounded whatever the batch.
constexpr int64_t kGroupBytes = int64_t(8) << 20;

// Passes run one sample per thread, over a shared packed copy of W, from this many samples
// per thread; below it, each pass is split over chunks of capsules (see run_passes).
constexpr int64_t kSamplesPerThread = 4;

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

  int64_t block_size() const { return d.in_dim * jd; }  // vectors of packed W per block
  const Vec<T>* input_block(int64_t b, int64_t blk) const { return inputs.data() + (b * blocks + blk) * d.in_dim; }
};

// Lane permutation for one butterfly stage of an L x L transpose: rows a and b = a + h
// become [a, b] shuffled by these indices (0..L-1 from a, L..2L-1 from b).
template <typename T, int64_t h, bool second, std::size_t... lane>
constexpr typename Simd<T>::ivec butterfly_indices(std::index_sequence<lane...>) {
  using Index = typename Simd<T>::integer;
  using Indices = typename Simd<T>::ivec;
  constexpr int64_t L = kLanes<T>;
  constexpr auto source = [](int64_t x) { return second ? ((x & h) ? L + x : x + h) : ((x & h) ? L + x - h : x); };
  return Indices{static_cast<Index>(source(static_cast<int64_t>(lane)))...};
}

// Transposes an L x L tile held as L row vectors, in place: log2(L) stages of two-vector
// shuffles instead of L * L scalar moves.
template <typename T, int64_t h = kLanes<T> / 2>
FASTCAPS_INLINE void transpose(Vec<T>* rows) {
  constexpr auto lanes = std::make_index_sequence<kLanes<T>>{};
  constexpr typename Simd<T>::ivec first = butterfly_indices<T, h, false>(lanes);
  constexpr typename Simd<T>::ivec second = butterfly_indices<T, h, true>(lanes);
  for (int64_t a = 0; a < kLanes<T>; ++a) {
    if (a & h) continue;
    const Vec<T> top = rows[a], bottom = rows[a + h];
    rows[a] = __builtin_shuffle(top, bottom, first);
    rows[a + h] = __builtin_shuffle(top, bottom, second);
  }
  if constexpr (h > 1) transpose<T, h / 2>(rows);
}

// rows[l][c] = src[l * stride + c] for l < used and c < columns; zero elsewhere.
template <typename T>
FASTCAPS_INLINE void load_tile(const T* src, int64_t stride, int64_t used, int64_t columns, Vec<T>* rows) {
  for (int64_t l = 0; l < kLanes<T>; ++l) {
    rows[l] = Vec<T>{};
    if (l >= used) continue;
    if (columns == kLanes<T>)
      std::memcpy(&rows[l], src + l * stride, sizeof(Vec<T>));
    else
      for (int64_t c = 0; c < columns; ++c) rows[l][c] = src[l * stride + c];
  }
}

// dst[l * stride + c] = rows[l][c] for l < used and c < columns.
template <typename T>
FASTCAPS_INLINE void store_tile(const Vec<T>* rows, int64_t used, int64_t columns, T* dst, int64_t stride) {
  for (int64_t l = 0; l < used; ++l) {
    if (columns == kLanes<T>)
      std::memcpy(dst + l * stride, &rows[l], sizeof(Vec<T>));
    else
      for (int64_t c = 0; c < columns; ++c) dst[l * stride + c] = rows[l][c];
  }
}

// Asks for values [start, start + count) ahead of their use, a cache line at a time: W's
// next run, read while this one is, so that a cold W streams from memory.
template <typename T>
FASTCAPS_INLINE void prefetch(const T* start, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t byte = 0; byte < count * int64_t(sizeof(T)); byte += 64) __builtin_prefetch(bytes + byte);
}

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
FASTCAPS_CLONES void pack_weight_block(const Dims& d, const int64_t* offset, const T* weight, int64_t blk, Vec<T>* out) {
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
FASTCAPS_CLONES void pack_input_block(const Dims& d, const T* u, int64_t b, int64_t blk, Vec<T>* out) {
  const int64_t L = kLanes<T>, used = std::min(L, d.in_caps - blk * L);
  Vec<T> tile[kLanes<T>];
  for (int64_t c0 = 0; c0 < d.in_dim; c0 += L) {
    const int64_t n = std::min(L, d.in_dim - c0);
    load_tile(u + (b * d.in_caps + blk * L) * d.in_dim + c0, d.in_dim, used, n, tile);
    transpose<T>(tile);
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

// Shuffle indices of one butterfly stage on segments of g lanes: lane o of the result takes,
// from segment o / g of the first (o % g < g/2) or second vector, its first (half = false)
// or second half's lane o % (g/2). The two shuffles added give both vectors' half-sums.
template <typename T, int64_t g, bool second_half, std::size_t... lane>
constexpr typename Simd<T>::ivec halving_indices(std::index_sequence<lane...>) {
  using Index = typename Simd<T>::integer;
  constexpr int64_t L = kLanes<T>, h = g / 2;
  constexpr auto source = [](int64_t o) {
    return (o % g < h ? 0 : L) + (o / g) * g + o % h + (second_half ? h : 0);
  };
  return typename Simd<T>::ivec{static_cast<Index>(source(static_cast<int64_t>(lane)))...};
}

// v[0..g) hold segments of g lanes; returns one vector of every segment's sum (which lane
// holds which segment: row_lane_outputs). Each stage halves both the segment length and the
// number of vectors.
template <typename T, int64_t g>
FASTCAPS_INLINE Vec<T> reduce_segments(Vec<T>* v) {
  if constexpr (g == 1) {
    return v[0];
  } else {
    constexpr auto lanes = std::make_index_sequence<kLanes<T>>{};
    constexpr typename Simd<T>::ivec first = halving_indices<T, g, false>(lanes);
    constexpr typename Simd<T>::ivec second = halving_indices<T, g, true>(lanes);
    for (int64_t k = 0; k < g / 2; ++k)
      v[k] = __builtin_shuffle(v[k], v[k + g / 2], first) + __builtin_shuffle(v[k], v[k + g / 2], second);
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

// Calls f(SegmentLength<Din>{}): g = Din as a compile-time constant (predicts_from_rows).
template <typename T, typename F>
FASTCAPS_INLINE auto with_segment_length(int64_t in_dim, const F& f) {
  switch (in_dim) {
    case 1: return f(SegmentLength<1>{});
    case 2: return f(SegmentLength<2>{});
    case 4: return f(SegmentLength<4>{});
    case 8: return f(SegmentLength<8>{});
    default:
      TORCH_INTERNAL_ASSERT(in_dim == 16 && kLanes<T> >= 16, "routing_cpu: no row prediction for in_dim ", in_dim);
      return f(SegmentLength<std::min<int64_t>(16, kLanes<T>)>{});
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
FASTCAPS_CLONES void predict_from_rows(const Packed<T>& p, int64_t blk, const Vec<T>* x, Vec<T>* uh) {
  // Forced inline, as the helpers are: a lambda is otherwise compiled once, for baseline x86-64.
  with_segment_length<T>(p.d.in_dim, [&](auto g) __attribute__((always_inline)) {
    predict_rows<T, g()>(p.d, p.row_outputs.data(), p.weight, blk, x, uh);
  });
}

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

// c[j] = softmax_j(uh_j . routed_j) lane-wise; uniform 1/J when routed is null (first pass).
template <typename T>
FASTCAPS_INLINE void couplings(const Vec<T>* uh, const T* routed, int64_t J, int64_t D, Vec<T>* c) {
  if (routed == nullptr) {
    for (int64_t j = 0; j < J; ++j) c[j] = Vec<T>{} + T(1) / T(J);
    return;
  }
  for (int64_t j = 0; j < J; ++j) {
    Vec<T> logit = {};
    for (int64_t dd = 0; dd < D; ++dd) logit += routed[j * D + dd] * uh[j * D + dd];
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
// routed is V_{t-1} (null on the first forward pass: uniform couplings). With predict the
// chunk's u_hat is computed into uh_sample, from chunk_weight (the chunk's packed W) or, when
// that is null, from W's rows; else it is read from uh_sample.
template <typename T>
struct Pass {
  int64_t sample, chunk;
  bool predict;
  const T* routed;
  const T* sigma;
};

template <typename T>
FASTCAPS_CLONES void sweep_chunk(const Packed<T>& p, const Pass<T>& pass, const Vec<T>* chunk_weight,
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
    couplings<T>(uh, pass.routed, J, D, scratch.couplings.data());
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
// With `kept` (B x blocks x jd vectors; the launcher asks for it at small batches, see
// fastcaps/_routing_cpu.py) every sample's u_hat lives there instead of in a scratch
// buffer: the forward leaves it for the backward, whose passes then read it.
template <typename T, typename PassOf, typename Finish>
void run_passes(const Packed<T>& p, int64_t steps, const PassOf& pass_of, const Finish& finish, Vec<T>* kept) {
  const int64_t per_sample = p.blocks * p.jd, partials_per_sample = p.chunks * p.jd, B = p.d.batch;
  if (steps == 0 || B == 0) return;
  const auto chunk_weight = [&](Scratch<T>& scratch, int64_t chunk) {
    return scratch.packed_weight(p, chunk * kChunkBlocks, std::min(p.blocks, (chunk + 1) * kChunkBlocks));
  };
  if (p.packed_weight.size() > 0) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      LaneArray<T> uh(kept == nullptr ? per_sample : 0);
      std::vector<T> partials(partials_per_sample);
      Scratch<T> scratch(p);
      for (int64_t b = begin; b < end; ++b) {
        Vec<T>* uh_sample = kept == nullptr ? uh.data() : kept + b * per_sample;
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
  const int64_t group = kept != nullptr ? B
      : std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(per_sample * sizeof(Vec<T>), 1), 1, B);
  LaneArray<T> scratch_uh(kept == nullptr ? group * per_sample : 0);
  Vec<T>* uh = kept == nullptr ? scratch_uh.data() : kept;
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

template <typename T>
void forward_kernel(const Packed<T>& p, const T* bias, T* v_out, T* s_out, Vec<T>* kept) {
  const Dims& d = p.d;
  const int64_t jd = p.jd, r = d.iterations;
  std::vector<T> routed(d.batch * jd, T(0));  // V_{t-1} per sample
  auto pass_of = [&](int64_t b, int64_t t, int64_t chunk) {
    return Pass<T>{b, chunk, t == 0, t == 0 ? nullptr : routed.data() + b * jd, nullptr};
  };
  auto finish = [&](int64_t b, int64_t t, const T* partials) {
    T* s = s_out + (b * r + t) * jd;
    T* v = v_out + b * jd;
    sum_chunks(partials, p.chunks, jd, s);
    if (bias != nullptr)
      for (int64_t k = 0; k < jd; ++k) s[k] += bias[k];
    squash(s, d.out_caps, d.out_dim, v);
    for (int64_t k = 0; k < jd; ++k) routed[b * jd + k] += v[k];
  };
  run_passes(p, r, pass_of, finish, kept);
}

// Per-sample routing state the backward needs: V_{t-1} and sigma_t = dL/ds_t, (B, r, jd) each.
template <typename T>
struct BackwardState {
  int64_t iterations, jd, first;  // first: the first iteration that carries gradient
  bool detach;
  std::vector<T> routed, sigma;
  const T* routed_at(int64_t b, int64_t t) const { return t == 0 ? nullptr : routed.data() + (b * iterations + t) * jd; }
  const T* sigma_at(int64_t b, int64_t t) const { return sigma.data() + (b * iterations + t) * jd; }
};

// g = dL/du_hat of sample b for one block of capsules (jd vectors), from its u_hat.
template <typename T>
FASTCAPS_INLINE void prediction_gradients(const Dims& d, const BackwardState<T>& state, int64_t b, const Vec<T>* uh,
                                          Scratch<T>& scratch, Vec<T>* g) {
  const int64_t J = d.out_caps, D = d.out_dim;
  Vec<T>* c = scratch.couplings.data();
  Vec<T>* delta = scratch.logit_grads.data();
  std::fill(g, g + J * D, Vec<T>{});
  for (int64_t t = state.first; t < d.iterations; ++t) {
    const T* routed = state.routed_at(b, t);
    const T* sigma = state.sigma_at(b, t);
    couplings<T>(uh, routed, J, D, c);
    // g += c_j sigma_t + delta_j V_{t-1}: through s_t, and through the logits of iteration t.
    if (routed != nullptr && !state.detach) {
      logit_gradients<T>(uh, sigma, c, J, D, delta);
      for (int64_t j = 0; j < J; ++j)
        for (int64_t dd = 0; dd < D; ++dd) g[j * D + dd] += c[j] * sigma[j * D + dd] + delta[j] * routed[j * D + dd];
    } else {
      for (int64_t j = 0; j < J; ++j)
        for (int64_t dd = 0; dd < D; ++dd) g[j * D + dd] += c[j] * sigma[j * D + dd];
    }
  }
}

// Phase B for one block of capsules, the batch in order: g = dL/du_hat (from the kept u_hat
// if there is one, else recomputed), then grad u = W^T g and grad W += u g^T, written in the
// caller's layouts.
template <typename T>
FASTCAPS_CLONES void gradient_block(const Packed<T>& p, const BackwardState<T>& state, const Vec<T>* kept, int64_t blk,
                                    Scratch<T>& scratch, T* grad_u, T* grad_weight) {
  const Dims& d = p.d;
  const int64_t Din = d.in_dim, jd = p.jd;
  const Vec<T>* w = scratch.packed_weight(p, blk, blk + 1);  // read for every sample of the batch
  const Vec<T>* uh;
  Vec<T>* gw = scratch.weight_grad.data();
  Vec<T>* grad_x = scratch.input_grad.data();
  std::fill(gw, gw + Din * jd, Vec<T>{});
  for (int64_t b = 0; b < d.batch; ++b) {
    const Vec<T>* x = p.input_block(b, blk);
    Vec<T>* g = scratch.row_grad.data();
    if (kept != nullptr) {
      uh = kept + (b * p.blocks + blk) * jd;
    } else {
      predict<T>(x, w, Din, jd, scratch.row.data());
      uh = scratch.row.data();
    }
    prediction_gradients(d, state, b, uh, scratch, g);
    // grad u[e] = sum_k w[e, k] * g[k], four partial sums to keep the adds independent.
    for (int64_t e = 0; e < Din; ++e) {
      const Vec<T>* we = w + e * jd;
      Vec<T> acc[4] = {};
      int64_t k = 0;
      for (; k + 4 <= jd; k += 4)
        for (int64_t r = 0; r < 4; ++r) acc[r] += we[k + r] * g[k + r];
      for (; k < jd; ++k) acc[0] += we[k] * g[k];
      grad_x[e] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
    unpack_input_block(d, grad_x, b, blk, grad_u);
    // grad W[e, k] += u[b, e] g[k], over the batch in order.
    for (int64_t e = 0; e < Din; ++e) {
      const Vec<T> xe = x[e];
      Vec<T>* gwe = gw + e * jd;
      for (int64_t k = 0; k < jd; ++k) gwe[k] += xe * g[k];
    }
  }
  unpack_weight_block(d, p.offset.data(), gw, blk, grad_weight);
}

// Lane q of expand_segments' result takes value q / g: each of L / g values repeated g times.
template <typename T, int64_t g, std::size_t... lane>
constexpr typename Simd<T>::ivec expand_indices(std::index_sequence<lane...>) {
  return typename Simd<T>::ivec{static_cast<typename Simd<T>::integer>(lane / g)...};
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
  const Vec<T> expanded = __builtin_shuffle(loaded, expand);
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

// Phase B for one block when the forward kept u_hat (small batches): g for every sample
// from the kept u_hat, turned capsule-major, then per output capsule j and capsule i,
// straight from W in its own layout:
//   grad W[j, i] = sum_b g[b, i, j] u[b, i]^T (batch order), grad u[b, i] += W[j, i]^T g[b, i, j].
// W and grad W are read and written in order with no transpose: at these batches moving W is
// most of the call. Where Din is a power of two that is done a vector at a time
// (gradient_rows); otherwise a value at a time, the block's run of W[j] for each j in turn.
// capsule_grads holds B * kLanes * jd values and kLanes of padding.
template <typename T>
FASTCAPS_CLONES void gradient_block_from_kept(const Packed<T>& p, const BackwardState<T>& state, const Vec<T>* kept,
                                              const T* u, int64_t blk, Scratch<T>& scratch, T* capsule_grads,
                                              T* grad_u, T* grad_weight) {
  const Dims& d = p.d;
  const int64_t L = kLanes<T>, I = d.in_caps, Din = d.in_dim, J = d.out_caps, D = d.out_dim, jd = p.jd;
  const int64_t used = std::min(L, I - blk * L);
  Vec<T>* g = scratch.row_grad.data();
  for (int64_t b = 0; b < d.batch; ++b) {
    prediction_gradients(d, state, b, kept + (b * p.blocks + blk) * jd, scratch, g);
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

// Up to this many samples phase B reads W in its own layout (gradient_block_from_kept);
// beyond, packing each block of W once for the batch costs less than its per-sample loops.
// (Measured with the kept u_hat, alternating in one process: faster at B = 1 only.)
constexpr int64_t kNativeGradientSamples = 1;

template <typename T>
void backward_kernel(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach, const Vec<T>* kept,
                     const T* u, T* grad_u, T* grad_weight, T* grad_bias) {
  const Dims& d = p.d;
  const int64_t B = d.batch, J = d.out_caps, D = d.out_dim, jd = p.jd, r = d.iterations;
  BackwardState<T> state{r, jd, detach ? r - 1 : 0, detach, std::vector<T>(B * r * jd, T(0)),
                         std::vector<T>(B * r * jd, T(0))};
  const auto s_at = [&](int64_t b, int64_t t) { return s_all + (b * r + t) * jd; };

  // V_{t-1} as the forward built it (same squash, same order: bitwise the same), and
  // sigma_{r-1} from grad v.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> v(jd);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 1; t < r; ++t) {
        squash(s_at(b, t - 1), J, D, v.data());
        T* routed = state.routed.data() + (b * r + t) * jd;  // V_{t-1} = V_{t-2} + v_{t-1}
        const T* before = routed - jd;                         // V_{t-2}, all zeros at t = 1
        for (int64_t k = 0; k < jd; ++k) routed[k] = before[k] + v[k];
      }
      squash_backward(s_at(b, r - 1), grad_v + b * jd, J, D, state.sigma.data() + (b * r + r - 1) * jd);
    }
  });

  // Phase A: pass k runs backward through iteration t = r-1-k, giving G = dL/dV_{t-1};
  // then dL/dv_{t-1} = the sum of the G so far, and sigma_{t-1} from it.
  std::vector<T> grad_routed(B * jd, T(0));
  auto pass_of = [&](int64_t b, int64_t k, int64_t chunk) {
    const int64_t t = r - 1 - k;
    return Pass<T>{b, chunk, k == 0 && kept == nullptr, state.routed_at(b, t), state.sigma_at(b, t)};
  };
  auto finish = [&](int64_t b, int64_t k, const T* partials) {
    const int64_t t = r - 1 - k;
    std::vector<T> grad_routed_t(jd);
    sum_chunks(partials, p.chunks, jd, grad_routed_t.data());
    T* total = grad_routed.data() + b * jd;
    for (int64_t q = 0; q < jd; ++q) total[q] += grad_routed_t[q];
    squash_backward(s_at(b, t - 1), total, J, D, state.sigma.data() + (b * r + t - 1) * jd);
  };
  // Reads the kept u_hat when there is one (run_passes writes only where it predicts).
  run_passes(p, detach ? 0 : r - 1, pass_of, finish, const_cast<Vec<T>*>(kept));

  // grad bias: every sigma_t that carries gradient, summed in a fixed order.
  std::fill(grad_bias, grad_bias + jd, T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = state.first; t < r; ++t)
      for (int64_t k = 0; k < jd; ++k) grad_bias[k] += state.sigma_at(b, t)[k];

  // Phase B: each block owned by one thread, so grad W is summed over the batch in order.
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(p);
    if (kept == nullptr || B > kNativeGradientSamples) {
      for (int64_t blk = begin; blk < end; ++blk) gradient_block(p, state, kept, blk, scratch, grad_u, grad_weight);
      return;
    }
    std::vector<T> capsule_grads(B * kLanes<T> * jd + kLanes<T>);  // padded for expand_segments
    for (int64_t blk = begin; blk < end; ++blk)
      gradient_block_from_kept(p, state, kept, u, blk, scratch, capsule_grads.data(), grad_u, grad_weight);
  });
}

Dims dims_of(const at::Tensor& u, const at::Tensor& weight, int64_t iterations) {
  TORCH_CHECK(u.dim() == 3, "routing_cpu: u must be (batch, in_caps, in_dim), got ", u.sizes());
  TORCH_CHECK(weight.dim() == 4, "routing_cpu: weight must be (out_caps, in_caps, out_dim, in_dim), got ",
              weight.sizes());
  TORCH_CHECK(iterations >= 1, "routing_cpu: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(weight.size(1) == u.size(1) && weight.size(3) == u.size(2), "routing_cpu: weight of shape ",
              weight.sizes(), " does not match u of shape ", u.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type(), "routing_cpu: u and weight must share a dtype");
  TORCH_INTERNAL_ASSERT(u.is_contiguous() && weight.is_contiguous(), "routing_cpu: the launcher passes contiguous tensors");
  return Dims{u.size(0), u.size(1), u.size(2), weight.size(0), weight.size(2), iterations};
}

// The forward's u_hat kept for the backward in `predictions` (B x blocks x jd vectors), or
// null when the launcher passed an empty tensor (fastcaps/_routing_cpu.py decides which).
template <typename T>
Vec<T>* kept_predictions(const at::Tensor& predictions, const Dims& d) {
  if (predictions.numel() == 0) return nullptr;
  TORCH_CHECK(predictions.numel() == d.batch * d.blocks<T>() * d.jd() * kLanes<T> && predictions.is_contiguous() &&
                  predictions.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "routing_cpu: predictions must be empty or hold batch * ceil(in_caps / ", kLanes<T>, ") * ", kLanes<T>,
              " * out_caps * out_dim contiguous values of u's dtype, got ", predictions.numel());
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(predictions.data_ptr()) % 64 == 0,
              "routing_cpu: predictions must be 64-byte aligned");
  return static_cast<Vec<T>*>(predictions.data_ptr());
}

std::tuple<at::Tensor, at::Tensor> routing_cpu_forward(const at::Tensor& u, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t iterations,
                                                       const at::Tensor& predictions) {
  const Dims d = dims_of(u, weight, iterations);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == d.jd() && bias.is_contiguous() && bias.scalar_type() == u.scalar_type()),
              "routing_cpu: bias must be empty or a contiguous (out_caps, out_dim) tensor of u's dtype");
  at::Tensor v = at::empty({d.batch, d.out_caps, d.out_dim}, u.options());
  at::Tensor s = at::empty({d.batch, d.iterations, d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_forward", [&] {
    const Packed<scalar_t> p =
        pack(d, u.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), samples_in_parallel(d.batch));
    forward_kernel<scalar_t>(p, bias.numel() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             v.mutable_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
                             kept_predictions<scalar_t>(predictions, d));
  });
  return {v, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                                    const at::Tensor& weight, const at::Tensor& s,
                                                                    const at::Tensor& predictions, int64_t iterations,
                                                                    bool detach) {
  const Dims d = dims_of(u, weight, iterations);
  TORCH_INTERNAL_ASSERT(grad_v.is_contiguous() && s.is_contiguous());
  TORCH_CHECK(grad_v.numel() == d.batch * d.jd() && s.numel() == d.batch * d.iterations * d.jd(),
              "routing_cpu: grad_v or s has the wrong size for u and weight");
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty({d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_backward", [&] {
    const Vec<scalar_t>* kept = kept_predictions<scalar_t>(predictions, d);
    // A shared packed W pays only for phase A's passes over many samples; without it,
    // phase B packs each block into its scratch (Scratch::packed_weight). With the
    // forward's u_hat kept, phase A never reads W, and at B = 1 phase B reads it unpacked.
    const Packed<scalar_t> p = pack(d, u.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                    kept == nullptr && !detach && iterations > 1 && samples_in_parallel(d.batch));
    backward_kernel<scalar_t>(p, grad_v.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), detach, kept,
                              u.const_data_ptr<scalar_t>(), grad_u.mutable_data_ptr<scalar_t>(),
                              grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_u, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastcaps

TORCH_LIBRARY_IMPL(fastcaps, CPU, m) {
  m.impl("routing_cpu_forward", &fastcaps::routing_cpu_forward);
  m.impl("routing_cpu_backward", &fastcaps::routing_cpu_backward);
}
