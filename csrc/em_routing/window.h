// EM routing at one window (one output position, or one sample of a class layer): the paper's
// M-step and E-step over the window's C child slots and J parents, and their adjoints, on the
// window's votes held in a per-thread buffer (C x J poses, 590 KB at the paper's ConvCaps1 in
// float32). The schedules (schedule.h) decide which of these a sweep over the windows runs.
//
// Notation (docs/em.md): slot c holds a child pose M_c (P x P) and activation a_c; its vote for
// parent j is V_cj = M_c W_jc (+ the slot's coordinate offsets), H = P * P entries indexed h.
// R (C x J) enters an M-step; r = R a, S_j = sum_c r_cj, D_j = max(S_j, eps), w = r / D,
// mu_j = sum_c w V, sigma^2_j = sum_c w (V - mu)^2 + floor,
// z_j = lambda (beta_a_j - sum_h (beta_u_j + log sigma_jh) S_j), log a_j = logsigmoid(z_j).
// The E-step's logits are L_cj = log a_j + log N(V_cj; mu_j, sigma^2_j), and R = exp(L - n_c)
// with n_c the slot's log-normaliser: logsumexp_j L_cj per window, or over every slot that
// holds the same child in the per-child form (the schedule computes it).
//
// Every vote, mean, variance and their gradients is one Pose vector (pose.h); R, L and their
// gradients are C x J scalars, exponentiated a native vector at a time (simd.h). Every sum runs
// in one fixed order (slots ascending; a pose's entries by butterflies) inside one thread, so a
// window's results do not depend on the thread that computes it.

#pragma once

#include "pose.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// n values of V (a vector type), 64-byte aligned, not initialized.
template <typename V>
class Aligned {
 public:
  explicit Aligned(int64_t n = 0) : size_(n), memory_(std::aligned_alloc(64, bytes(n))) {
    TORCH_CHECK(memory_ != nullptr, "em_cpu: out of memory allocating ", bytes(n), " bytes");
  }
  V* data() const { return static_cast<V*>(memory_.get()); }
  V& operator[](int64_t k) const { return data()[k]; }
  int64_t size() const { return size_; }

 private:
  static std::size_t bytes(int64_t n) { return (std::max<int64_t>(n, 1) * sizeof(V) + 63) / 64 * 64; }
  struct Free {
    void operator()(void* memory) const { std::free(memory); }
  };
  int64_t size_;
  std::unique_ptr<void, Free> memory_;
};

// The shapes of a call (P is the Pose's, fixed at compile time).
struct EMShape {
  int64_t windows;     // N: windows in this call
  int64_t per_sample;  // windows of one sample (1 for a class layer)
  int64_t children;    // C: child slots per window
  int64_t out_caps;    // J
  int64_t iterations;  // r
};

template <typename T>
struct EMOptions {
  std::vector<T> lambdas;  // one inverse temperature per iteration
  T eps;
  T variance_floor;
  bool detach_routing;
};

// log(sigmoid(z)) = min(z, 0) - log1p(exp(-|z|)), finite for every z.
template <typename T>
FASTCAPS_INLINE T log_sigmoid(T z) {
  return std::min(z, T(0)) - std::log1p(std::exp(-std::abs(z)));
}

template <typename T>
FASTCAPS_INLINE T sigmoid(T z) {
  return z >= 0 ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z));
}

// out[k] = exp(x[k] - shift) for k < n, with every x[k] <= shift: a native vector at a time.
template <typename T>
FASTCAPS_INLINE void exp_shifted(const T* x, T shift, T* out, int64_t n) {
  int64_t k0 = 0;
  for (; k0 + kLanes<T> <= n; k0 += kLanes<T>) store_unaligned(out + k0, exp_nonpositive<T>(load_unaligned(x + k0) - shift));
  if (k0 == n) return;
  Vec<T> v = {};
  for (int64_t l = 0; k0 + l < n; ++l) v[l] = x[k0 + l] - shift;
  v = exp_nonpositive<T>(v);
  for (int64_t l = 0; k0 + l < n; ++l) out[k0 + l] = v[l];
}

// The parents' state of one iteration at one window: mu and sigma^2 (J poses) and log a (J).
template <typename T, int64_t P>
struct Parents {
  using Lanes = Pose<T, P>;
  using vec = typename Lanes::vec;
  Aligned<vec> mu, variance;
  std::vector<T> log_a;
  explicit Parents(int64_t out_caps) : mu(out_caps), variance(out_caps), log_a(out_caps) {}

  // From and to a state row [mu (J, P, P) | sigma^2 (J, P, P) | log a (J)]. A variance's padded
  // lanes read 1, so that the quotients by it stay finite there.
  void load(const T* row, int64_t J) {
    for (int64_t j = 0; j < J; ++j) {
      mu[j] = Lanes::load(row + j * Lanes::entries);
      variance[j] = Lanes::load(row + (J + j) * Lanes::entries);
      for (int64_t h = Lanes::entries; h < Lanes::lanes; ++h) variance[j][h] = T(1);
    }
    std::copy(row + 2 * J * Lanes::entries, row + 2 * J * Lanes::entries + J, log_a.begin());
  }
  void store(T* row, int64_t J) const {
    for (int64_t j = 0; j < J; ++j) {
      Lanes::store(row + j * Lanes::entries, mu[j]);
      Lanes::store(row + (J + j) * Lanes::entries, variance[j]);
    }
    std::copy(log_a.begin(), log_a.end(), row + 2 * J * Lanes::entries);
  }
};

// What one M-step computes, kept for its adjoint.
template <typename T, int64_t P>
struct MStep : Parents<T, P> {
  Aligned<typename Pose<T, P>::vec> log_variance;
  std::vector<T> r_sum, denominator, z, weights;  // weights: w = r / D (C, J)
  MStep(int64_t children, int64_t out_caps)
      : Parents<T, P>(out_caps), log_variance(out_caps), r_sum(out_caps), denominator(out_caps), z(out_caps),
        weights(children * out_caps) {}
};

// The cotangents of a window's (mu, sigma^2, log a) flowing back into an M-step.
template <typename T, int64_t P>
struct Cotangents {
  Aligned<typename Pose<T, P>::vec> mu, variance;
  std::vector<T> log_a;
  explicit Cotangents(int64_t out_caps) : mu(out_caps), variance(out_caps), log_a(out_caps) {}
};

// The per-call constants every window reads, and the per-window steps.
template <typename T, int64_t P>
struct EMWindow {
  using Lanes = Pose<T, P>;
  using vec = typename Lanes::vec;
  static constexpr int64_t H = Lanes::entries;

  EMShape shape;
  const EMOptions<T>& options;
  const T* weight;   // (J, C, P, P)
  const T* offsets;  // (C, P, P) or null
  const T* beta_u;   // (J)
  const T* beta_a;   // (J)

  int64_t J() const { return shape.out_caps; }
  int64_t C() const { return shape.children; }
  vec weight_of(int64_t c, int64_t j) const { return Lanes::load(weight + (j * C() + c) * H); }

  // votes (C x J poses) from the window's child poses m (C, P, P): V_cj = M_c W_jc (+ offset).
  void form_votes(const T* m, vec* votes) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const typename Lanes::Factors pose = Lanes::columns(Lanes::load(m + c * H));
      const vec offset = offsets != nullptr ? Lanes::load(offsets + c * H) : vec{};
      for (int64_t j = 0; j < J; ++j) votes[c * J + j] = Lanes::multiply_add(pose, weight_of(c, j), offset);
    }
  }

  // The M-step of iteration t on responsibilities R (C, J) and activations a (C).
  void m_step(const vec* votes, const T* R, const T* a, int64_t t, MStep<T, P>& s) const {
    const int64_t J = this->J(), C = this->C();
    std::fill(s.r_sum.begin(), s.r_sum.end(), T(0));
    for (int64_t j = 0; j < J; ++j) s.mu[j] = s.variance[j] = vec{};
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) s.r_sum[j] += R[c * J + j] * a[c];
    for (int64_t j = 0; j < J; ++j) s.denominator[j] = std::max(s.r_sum[j], options.eps);
    // w = r / D, once per M-step (a loop over j that vectorizes), by a division, not a product
    // with 1 / D: the gradient of the activations sums terms of both signs, and the extra
    // rounding took its float32 error from 1.1e-3 to 2.7e-3 relative at one check call (K = 1,
    // J = 2, P = 2), 2.6 times the reference's own.
    T* w = s.weights.data();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) w[c * J + j] = R[c * J + j] * a[c] / s.denominator[j];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) s.mu[j] += w[c * J + j] * votes[c * J + j];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const vec diff = votes[c * J + j] - s.mu[j];
        s.variance[j] += w[c * J + j] * (diff * diff);
      }
    const T lambda = options.lambdas[t];
    for (int64_t j = 0; j < J; ++j) {
      s.variance[j] += options.variance_floor;
      T cost = 0;
      for (int64_t h = 0; h < Lanes::lanes; ++h) {
        s.log_variance[j][h] = std::log(s.variance[j][h]);
        if (h < H) cost += (beta_u[j] + T(0.5) * s.log_variance[j][h]) * s.r_sum[j];
      }
      s.z[j] = lambda * (beta_a[j] - cost);
      s.log_a[j] = log_sigmoid(s.z[j]);
    }
  }

  // The E-step's logits L (C, J) from the parents' state of an iteration.
  void logits(const vec* votes, const Parents<T, P>& parents, T* L) const {
    const int64_t J = this->J(), C = this->C();
    Aligned<vec> inverse(J);
    std::vector<T> constant(J);
    for (int64_t j = 0; j < J; ++j) {
      inverse[j] = T(1) / parents.variance[j];
      T log_norm = 0;
      for (int64_t h = 0; h < H; ++h) log_norm += std::log(T(2 * M_PI) * parents.variance[j][h]);
      constant[j] = parents.log_a[j] - T(0.5) * log_norm;
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const vec diff = votes[c * J + j] - parents.mu[j];
        L[c * J + j] = constant[j] - T(0.5) * Lanes::entry_sum(diff * diff * inverse[j]);
      }
  }

  // Each slot's logsumexp over the parents: the per-window log-normaliser. `row` is J of scratch.
  void slot_normalisers(const T* L, T* normaliser, T* row) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const T largest = *std::max_element(L + c * J, L + (c + 1) * J);
      exp_shifted(L + c * J, largest, row, J);
      T total = 0;
      for (int64_t j = 0; j < J; ++j) total += row[j];
      normaliser[c] = largest + std::log(total);
    }
  }

  // R = exp(L - n_c) (every L_cj <= n_c).
  void responsibilities(const T* L, const T* normaliser, T* R) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) exp_shifted(L + c * J, normaliser[c], R + c * J, J);
  }

  // The adjoint of m_step: from the cotangents g of its (mu, sigma^2, log a), adds the votes'
  // part to grad_votes (C x J poses), the activations' to grad_a (C), beta's to grad_beta_u /
  // grad_beta_a (J), and writes the cotangent of R to grad_R (C, J).
  void m_step_backward(const vec* votes, const T* R, const T* a, int64_t t, const MStep<T, P>& s,
                       const Cotangents<T, P>& g, vec* grad_votes, T* grad_a, T* grad_beta_u, T* grad_beta_a,
                       T* grad_R) const {
    const int64_t J = this->J(), C = this->C();
    const T lambda = options.lambdas[t];
    Aligned<vec> g_variance(J), g_mu(J);
    std::vector<T> g_r_sum(J), g_denominator(J, T(0));
    const T* weights = s.weights.data();
    for (int64_t j = 0; j < J; ++j) {
      const T g_z = g.log_a[j] * sigmoid(-s.z[j]);
      grad_beta_a[j] += lambda * g_z;
      const T g_cost = -lambda * g_z;  // d/d cost_j^h, the same for every h
      grad_beta_u[j] += g_cost * s.r_sum[j] * T(H);
      g_variance[j] = g.variance[j] + (g_cost * s.r_sum[j] * T(0.5)) / s.variance[j];
      T per_entry = 0;
      for (int64_t h = 0; h < H; ++h) per_entry += beta_u[j] + T(0.5) * s.log_variance[j][h];
      g_r_sum[j] = g_cost * per_entry;
      // sigma^2 = sum_c w (V - mu)^2 + floor depends on mu too, through sum_c w (V - mu) =
      // mu (1 - S / D): 0 unless S < eps (the torch kernel sums it over the votes, ~0 by rounding).
      g_mu[j] = g.mu[j] - 2 * g_variance[j] * (s.mu[j] * (T(1) - s.r_sum[j] / s.denominator[j]));
    }
    // grad_R holds dL/dw until every slot's share of dL/dD is known.
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T r = R[c * J + j] * a[c];
        const T w = weights[c * J + j];
        const vec v = votes[c * J + j];
        const vec diff = v - s.mu[j];
        const T g_w = Lanes::entry_sum(g_variance[j] * diff * diff + g_mu[j] * v);
        grad_votes[c * J + j] += (2 * g_variance[j] * diff + g_mu[j]) * w;
        grad_R[c * J + j] = g_w;
        g_denominator[j] += g_w * r;
      }
    for (int64_t j = 0; j < J; ++j) {
      const T d = s.denominator[j];
      g_r_sum[j] += s.r_sum[j] >= options.eps ? -g_denominator[j] / (d * d) : T(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      T* g_r = grad_R + c * J;  // dL/dw, then dL/dr (a loop that vectorizes), then dL/dR
      for (int64_t j = 0; j < J; ++j) g_r[j] = g_r[j] / s.denominator[j] + g_r_sum[j];
      T g_a = 0;
      for (int64_t j = 0; j < J; ++j) g_a += g_r[j] * R[c * J + j];
      for (int64_t j = 0; j < J; ++j) g_r[j] *= a[c];
      grad_a[c] += g_a;
    }
  }

  // Each slot's sum over the parents of grad_R * R: the E-step adjoint's per-slot total (summed
  // over the child's slots in the per-child form).
  void slot_totals(const T* R, const T* grad_R, T* total) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      T sum = 0;
      for (int64_t j = 0; j < J; ++j) sum += grad_R[c * J + j] * R[c * J + j];
      total[c] = sum;
    }
  }

  // The adjoint of the E-step that made R from `parents`, the state of the iteration before:
  // writes the cotangents of that state into g and subtracts the votes' part from grad_votes.
  void e_step_backward(const vec* votes, const T* R, const T* grad_R, const T* total, const Parents<T, P>& parents,
                       Cotangents<T, P>& g, vec* grad_votes) const {
    const int64_t J = this->J(), C = this->C();
    Aligned<vec> inverse(J);
    for (int64_t j = 0; j < J; ++j) {
      inverse[j] = T(1) / parents.variance[j];
      g.mu[j] = g.variance[j] = vec{};
      g.log_a[j] = T(0);
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T rho = R[c * J + j];
        const T g_logit = grad_R[c * J + j] * rho - rho * total[c];
        const vec diff = votes[c * J + j] - parents.mu[j];
        const vec weighted = g_logit * diff * inverse[j];
        g.mu[j] += weighted;
        g.variance[j] += (T(0.5) * g_logit) * (diff * diff * inverse[j] * inverse[j] - inverse[j]);
        grad_votes[c * J + j] -= weighted;
        g.log_a[j] += g_logit;
      }
  }

  // From grad_votes (C x J poses): grad m (C, P, P) += sum_j grad V_cj W_jc^T, and
  // grad W_jc += M_c^T grad V_cj into grad_weight (J, C, P, P).
  void pose_and_weight_gradients(const T* m, const vec* grad_votes, T* grad_m, T* grad_weight) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const typename Lanes::Factors pose = Lanes::rows_as_columns(Lanes::load(m + c * H));
      vec gm = Lanes::load(grad_m + c * H);
      for (int64_t j = 0; j < J; ++j) {
        const vec gv = grad_votes[c * J + j];
        gm = Lanes::multiply_transpose_add(gv, weight_of(c, j), gm);
        T* gw = grad_weight + (j * C + c) * H;
        Lanes::store(gw, Lanes::transpose_multiply_add(pose, gv, Lanes::load(gw)));
      }
      Lanes::store(grad_m + c * H, gm);
    }
  }
};

FASTCAPS_KERNELS_END
