// SIMD building blocks shared by the CPU kernels: GCC vector types of the instruction set's
// native width, a lane-wise exp, aligned arrays, in-register transposes, tile loads and
// stores, and prefetch.
//
// The kernels are compiled once per instruction set, each in a translation unit of its own
// (csrc/<op>/isa_*.cpp) that defines, before including the kernels:
//   FASTCAPS_ISA            the namespace of that build (avx512, avx2, baseline);
//   FASTCAPS_VECTOR_BYTES   its vector width: 64 (AVX-512), 32 (AVX2), 16 (SSE2, NEON);
// and compiles them for that instruction set (#pragma GCC target). Everything here has
// internal linkage inside fastcaps::FASTCAPS_ISA, so the builds never share a function.

#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#if !defined(FASTCAPS_ISA) || !defined(FASTCAPS_VECTOR_BYTES)
#error "include the kernels from an instruction-set build (csrc/<op>/isa_*.cpp), which defines both"
#endif

// The helpers are forced inline into the kernels that call them (the lambdas too).
#define FASTCAPS_INLINE inline __attribute__((always_inline))
#define FASTCAPS_KERNELS_BEGIN namespace fastcaps { namespace FASTCAPS_ISA { namespace {
#define FASTCAPS_KERNELS_END } } }

FASTCAPS_KERNELS_BEGIN

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(FASTCAPS_VECTOR_BYTES)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> integer;
  typedef integer ivec __attribute__((vector_size(FASTCAPS_VECTOR_BYTES)));
  static constexpr int64_t lanes = FASTCAPS_VECTOR_BYTES / sizeof(T);
};
template <typename T>
using Vec = typename Simd<T>::vec;

// Vector registers of the instruction set (AVX-512 and NEON 32, AVX2 and SSE2 16): a
// register-blocked loop keeps about half of them as accumulators.
#if FASTCAPS_VECTOR_BYTES == 64 || defined(__aarch64__)
constexpr int64_t kVectorRegisters = 32;
#else
constexpr int64_t kVectorRegisters = 16;
#endif
constexpr int64_t kAccumulators = kVectorRegisters / 2;
template <typename T>
constexpr int64_t kLanes = Simd<T>::lanes;

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
// aligned vector loads of misaligned memory fault; 64 is a cache line and every width's
// multiple). Not initialized: users write before reading.
template <typename T>
class LaneArray {
 public:
  explicit LaneArray(int64_t n = 0) : size_(n), memory_(std::aligned_alloc(64, bytes(n))) {
    TORCH_CHECK(memory_ != nullptr, "routing_cpu: out of memory allocating ", bytes(n), " bytes");
  }
  Vec<T>* data() const { return static_cast<Vec<T>*>(memory_.get()); }
  int64_t size() const { return size_; }

 private:
  // aligned_alloc takes a multiple of the alignment.
  static std::size_t bytes(int64_t n) { return (std::max<int64_t>(n, 1) * sizeof(Vec<T>) + 63) / 64 * 64; }
  struct Free {
    void operator()(void* memory) const { std::free(memory); }
  };
  int64_t size_;
  std::unique_ptr<void, Free> memory_;
};

// Lanes of a and b picked by Source::at(lane) for each lane of the result, 0..L-1 from a and
// L..2L-1 from b, at compile time: GCC's __builtin_shuffle, clang's __builtin_shufflevector.
template <typename T, typename Source, std::size_t... lane>
FASTCAPS_INLINE Vec<T> shuffle(const Vec<T>& a, const Vec<T>& b, std::index_sequence<lane...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, Source::at(lane)...);
#else
  using Index = typename Simd<T>::integer;
  return __builtin_shuffle(a, b, typename Simd<T>::ivec{static_cast<Index>(Source::at(lane))...});
#endif
}
template <typename T, typename Source>
FASTCAPS_INLINE Vec<T> shuffle(const Vec<T>& a, const Vec<T>& b) {
  return shuffle<T, Source>(a, b, std::make_index_sequence<kLanes<T>>{});
}

// One butterfly stage of an L x L transpose: rows a and b = a + h become [a, b] shuffled
// by these lanes.
template <typename T, int64_t h, bool second>
struct ButterflyLanes {
  static constexpr int64_t at(int64_t x) {
    constexpr int64_t L = kLanes<T>;
    return second ? ((x & h) ? L + x : x + h) : ((x & h) ? L + x - h : x);
  }
};

// Transposes an L x L tile held as L row vectors, in place: log2(L) stages of two-vector
// shuffles instead of L * L scalar moves.
template <typename T, int64_t h = kLanes<T> / 2>
FASTCAPS_INLINE void transpose(Vec<T>* rows) {
  for (int64_t a = 0; a < kLanes<T>; ++a) {
    if (a & h) continue;
    const Vec<T> top = rows[a], bottom = rows[a + h];
    rows[a] = shuffle<T, ButterflyLanes<T, h, false>>(top, bottom);
    rows[a + h] = shuffle<T, ButterflyLanes<T, h, true>>(top, bottom);
  }
  if constexpr (h > 1) transpose<T, h / 2>(rows);
}

// out[k] = the sum of v[k]'s lanes, lanes in order from lane 0, for k < n: kLanes vectors
// at a time by a transpose and lane-wise adds, the same sums as one lane after another.
template <typename T>
FASTCAPS_INLINE void lane_sums(const Vec<T>* v, int64_t n, T* out) {
  Vec<T> tile[kLanes<T>];
  for (int64_t k0 = 0; k0 < n; k0 += kLanes<T>) {
    const int64_t count = std::min(kLanes<T>, n - k0);
    for (int64_t q = 0; q < kLanes<T>; ++q) tile[q] = q < count ? v[k0 + q] : Vec<T>{};
    transpose<T>(tile);
    Vec<T> total = {};
    for (int64_t l = 0; l < kLanes<T>; ++l) total += tile[l];
    for (int64_t q = 0; q < count; ++q) out[k0 + q] = total[q];
  }
}

// A vector of T from and to any address aligned for T: one unaligned vector load or store.
// (memcpy, not a cast to an under-aligned vector type: GCC drops that attribute on a
// dependent type and emitted aligned moves, which fault on a row that is not 32-byte aligned.)
template <typename T>
FASTCAPS_INLINE Vec<T> load_unaligned(const T* src) {
  Vec<T> v;
  std::memcpy(&v, src, sizeof(Vec<T>));
  return v;
}
template <typename T>
FASTCAPS_INLINE void store_unaligned(T* dst, const Vec<T>& v) {
  std::memcpy(dst, &v, sizeof(Vec<T>));
}

// rows[l][c] = src[l * stride + c] for l < used and c < columns; zero elsewhere. A full tile
// is one vector load per row: the general loop below kept the tile on the stack, stored in
// halves and reloaded whole (store forwarding failed: the hottest lines of the votes'
// transpose, perf on AVX2, Zen 3).
template <typename T>
FASTCAPS_INLINE void load_tile(const T* src, int64_t stride, int64_t used, int64_t columns, Vec<T>* rows) {
  if (used == kLanes<T> && columns == kLanes<T>) {
    for (int64_t l = 0; l < kLanes<T>; ++l) rows[l] = load_unaligned(src + l * stride);
    return;
  }
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
  if (used == kLanes<T> && columns == kLanes<T>) {
    for (int64_t l = 0; l < kLanes<T>; ++l) store_unaligned(dst + l * stride, rows[l]);
    return;
  }
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

FASTCAPS_KERNELS_END
