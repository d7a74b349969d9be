// EM routing at one window (one output position, or one sample of a class layer): the paper's
// M-step and E-step over the window's C child slots and J parents, and their adjoints, on the
// window's votes held in a per-thread buffer (C x J x H values, 590 KB at the paper's ConvCaps1
// in float32). The schedules (schedule.h) decide which of these a sweep over the windows runs.
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
// Every sum runs in one fixed order (slots ascending, entries by `entry_sum`), inside one
// thread: a window's results do not depend on the thread that computes it.

#pragma once

#include "../common/simd.h"

#include <cmath>
#include <cstdint>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// The shapes and options of a call. kSide > 0 fixes P at compile time (4, the paper's), so that
// the loops over a vote's H entries have a constant trip count and vectorize; 0 reads `side`.
template <int64_t kSide>
struct EMShape {
  int64_t windows;     // N: windows in this call
  int64_t per_sample;  // windows of one sample (1 for a class layer)
  int64_t children;    // C: child slots per window
  int64_t out_caps;    // J
  int64_t side_;       // P
  int64_t iterations;  // r
  int64_t side() const { return kSide > 0 ? kSide : side_; }
  int64_t entries() const { return side() * side(); }
  int64_t votes() const { return children * out_caps * entries(); }
  int64_t state() const { return out_caps * (2 * entries() + 1); }  // [mu | sigma^2 | log a] per iteration
};

template <typename T>
struct EMOptions {
  std::vector<T> lambdas;  // one inverse temperature per iteration
  T eps;
  T variance_floor;
  bool detach_routing;
};

// A sum over a vote's H entries in one fixed order: pairwise halves for H = 16 (elementwise
// adds that vectorize), else in order.
template <int64_t kSide, typename T>
FASTCAPS_INLINE T entry_sum(T* terms, int64_t entries) {
  if constexpr (kSide == 4) {
    for (int64_t half = 8; half >= 1; half /= 2)
      for (int64_t h = 0; h < half; ++h) terms[h] += terms[h + half];
    return terms[0];
  } else {
    T total = 0;
    for (int64_t h = 0; h < entries; ++h) total += terms[h];
    return total;
  }
}

// log(sigmoid(z)) = min(z, 0) - log1p(exp(-|z|)), finite for every z.
template <typename T>
FASTCAPS_INLINE T log_sigmoid(T z) {
  return std::min(z, T(0)) - std::log1p(std::exp(-std::abs(z)));
}

template <typename T>
FASTCAPS_INLINE T sigmoid(T z) {
  return z >= 0 ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z));
}

// What one M-step computes, kept for its adjoint: J-sized and J x H-sized arrays.
template <typename T>
struct MStep {
  std::vector<T> r_sum, denominator, mu, variance, log_variance, z, log_a;
  MStep(int64_t out_caps, int64_t entries)
      : r_sum(out_caps), denominator(out_caps), mu(out_caps * entries), variance(out_caps * entries),
        log_variance(out_caps * entries), z(out_caps), log_a(out_caps) {}
};

// The per-call constants every window reads, and the per-window steps.
template <typename T, int64_t kSide>
struct EMWindow {
  EMShape<kSide> shape;
  const EMOptions<T>& options;
  const T* weight_by_row;  // (J, C, P, H): W_jc[b, d] at [j][c][b][a * P + d], for every a
  const T* offsets;        // (C, H) or null
  const T* beta_u;         // (J)
  const T* beta_a;         // (J)

  int64_t J() const { return shape.out_caps; }
  int64_t C() const { return shape.children; }
  int64_t H() const { return shape.entries(); }
  int64_t P() const { return shape.side(); }

  // votes (C, J, H) from the window's poses m (C, P, P): V_cj[a, d] = sum_b m_c[a, b] W_jc[b, d].
  // rows (P, H) is scratch: rows[b][a * P + d] = m_c[a, b], so that each b is one multiply-add
  // of H-long rows.
  void form_votes(const T* m, T* votes, T* rows) const {
    const int64_t P = this->P(), H = this->H(), J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const T* pose = m + c * H;
      for (int64_t b = 0; b < P; ++b)
        for (int64_t a = 0; a < P; ++a)
          for (int64_t d = 0; d < P; ++d) rows[b * H + a * P + d] = pose[a * P + b];
      const T* offset = offsets != nullptr ? offsets + c * H : nullptr;
      for (int64_t j = 0; j < J; ++j) {
        const T* w = weight_by_row + (j * C + c) * P * H;
        T* v = votes + (c * J + j) * H;
        for (int64_t h = 0; h < H; ++h) v[h] = offset != nullptr ? offset[h] : T(0);
        for (int64_t b = 0; b < P; ++b)
          for (int64_t h = 0; h < H; ++h) v[h] += rows[b * H + h] * w[b * H + h];
      }
    }
  }

  // The M-step of iteration t on responsibilities R (C, J) and activations a (C).
  void m_step(const T* votes, const T* R, const T* a, int64_t t, MStep<T>& s) const {
    const int64_t H = this->H(), J = this->J(), C = this->C();
    std::fill(s.r_sum.begin(), s.r_sum.end(), T(0));
    std::fill(s.mu.begin(), s.mu.end(), T(0));
    std::fill(s.variance.begin(), s.variance.end(), T(0));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) s.r_sum[j] += R[c * J + j] * a[c];
    for (int64_t j = 0; j < J; ++j) s.denominator[j] = std::max(s.r_sum[j], options.eps);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T w = R[c * J + j] * a[c] / s.denominator[j];
        const T* v = votes + (c * J + j) * H;
        T* mu = s.mu.data() + j * H;
        for (int64_t h = 0; h < H; ++h) mu[h] += w * v[h];
      }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T w = R[c * J + j] * a[c] / s.denominator[j];
        const T* v = votes + (c * J + j) * H;
        const T* mu = s.mu.data() + j * H;
        T* variance = s.variance.data() + j * H;
        for (int64_t h = 0; h < H; ++h) variance[h] += w * (v[h] - mu[h]) * (v[h] - mu[h]);
      }
    const T lambda = options.lambdas[t];
    for (int64_t j = 0; j < J; ++j) {
      T cost = 0;
      for (int64_t h = 0; h < H; ++h) {
        T& variance = s.variance[j * H + h];
        variance += options.variance_floor;
        s.log_variance[j * H + h] = std::log(variance);
        cost += (beta_u[j] + T(0.5) * s.log_variance[j * H + h]) * s.r_sum[j];
      }
      s.z[j] = lambda * (beta_a[j] - cost);
      s.log_a[j] = log_sigmoid(s.z[j]);
    }
  }

  // The E-step's logits L (C, J) from a parents' state (mu, sigma^2, log a), each (J, H) or (J);
  // `terms` is H of scratch.
  void logits(const T* votes, const T* mu, const T* variance, const T* log_a, T* L, T* terms) const {
    const int64_t H = this->H(), J = this->J(), C = this->C();
    std::vector<T> inverse(J * H), constant(J);
    for (int64_t j = 0; j < J; ++j) {
      T log_norm = 0;
      for (int64_t h = 0; h < H; ++h) {
        inverse[j * H + h] = T(1) / variance[j * H + h];
        log_norm += std::log(T(2 * M_PI) * variance[j * H + h]);
      }
      constant[j] = log_a[j] - T(0.5) * log_norm;
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T* v = votes + (c * J + j) * H;
        const T* m = mu + j * H;
        const T* inv = inverse.data() + j * H;
        for (int64_t h = 0; h < H; ++h) terms[h] = (v[h] - m[h]) * (v[h] - m[h]) * inv[h];
        L[c * J + j] = constant[j] - T(0.5) * entry_sum<kSide>(terms, H);
      }
  }

  // Each slot's logsumexp over the parents: the per-window log-normaliser.
  void slot_normalisers(const T* L, T* normaliser) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const T* row = L + c * J;
      T largest = row[0];
      for (int64_t j = 1; j < J; ++j) largest = std::max(largest, row[j]);
      T total = 0;
      for (int64_t j = 0; j < J; ++j) total += std::exp(row[j] - largest);
      normaliser[c] = largest + std::log(total);
    }
  }

  // R = exp(L - n_c), in place.
  void responsibilities(T* L, const T* normaliser) const {
    const int64_t J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) L[c * J + j] = std::exp(L[c * J + j] - normaliser[c]);
  }

  // The adjoint of m_step: from the cotangents of (mu, sigma^2, log a) of its output (grad_mu,
  // grad_variance: J x H; grad_log_a: J), adds the votes' part to grad_votes (C, J, H), the
  // activations' to grad_a (C), beta's to grad_beta_u / grad_beta_a (J), and writes the
  // cotangent of R to grad_R (C, J).
  void m_step_backward(const T* votes, const T* R, const T* a, int64_t t, const MStep<T>& s, const T* grad_mu,
                       const T* grad_variance, const T* grad_log_a, T* grad_votes, T* grad_a, T* grad_beta_u,
                       T* grad_beta_a, T* grad_R) const {
    const int64_t H = this->H(), J = this->J(), C = this->C();
    const T lambda = options.lambdas[t];
    std::vector<T> g_variance(J * H), g_mu(J * H), g_r_sum(J), weighted_diff(J * H, T(0)), g_denominator(J, T(0));
    for (int64_t j = 0; j < J; ++j) {
      const T g_z = grad_log_a[j] * sigmoid(-s.z[j]);
      grad_beta_a[j] += lambda * g_z;
      const T g_cost = -lambda * g_z;  // d/d cost_j^h, the same for every h
      grad_beta_u[j] += g_cost * s.r_sum[j] * T(H);
      T per_entry = 0;
      for (int64_t h = 0; h < H; ++h) {
        g_variance[j * H + h] = grad_variance[j * H + h] + g_cost * s.r_sum[j] * T(0.5) / s.variance[j * H + h];
        per_entry += beta_u[j] + T(0.5) * s.log_variance[j * H + h];
      }
      g_r_sum[j] = g_cost * per_entry;
    }
    // sigma^2 = sum_c w (V - mu)^2 + floor depends on mu too: sum_c w (V - mu), ~0 but kept.
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T w = R[c * J + j] * a[c] / s.denominator[j];
        const T* v = votes + (c * J + j) * H;
        const T* mu = s.mu.data() + j * H;
        T* sum = weighted_diff.data() + j * H;
        for (int64_t h = 0; h < H; ++h) sum[h] += w * (v[h] - mu[h]);
      }
    for (int64_t k = 0; k < J * H; ++k) g_mu[k] = grad_mu[k] - 2 * g_variance[k] * weighted_diff[k];
    // grad_R holds dL/dw until every slot's share of dL/dD is known.
    std::vector<T> terms(2 * H);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T r = R[c * J + j] * a[c];
        const T w = r / s.denominator[j];
        const T* v = votes + (c * J + j) * H;
        const T* mu = s.mu.data() + j * H;
        const T* gv2 = g_variance.data() + j * H;
        const T* gm = g_mu.data() + j * H;
        T* gv = grad_votes + (c * J + j) * H;
        for (int64_t h = 0; h < H; ++h) {
          const T diff = v[h] - mu[h];
          terms[h] = gv2[h] * diff * diff;
          terms[H + h] = gm[h] * v[h];
          gv[h] += 2 * gv2[h] * w * diff + gm[h] * w;
        }
        const T g_w = entry_sum<kSide>(terms.data(), H) + entry_sum<kSide>(terms.data() + H, H);
        grad_R[c * J + j] = g_w;
        g_denominator[j] += g_w * r;
      }
    for (int64_t j = 0; j < J; ++j) {
      const T d = s.denominator[j];
      g_denominator[j] = -g_denominator[j] / (d * d);
      g_r_sum[j] += s.r_sum[j] >= options.eps ? g_denominator[j] : T(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      T g_a = 0;
      for (int64_t j = 0; j < J; ++j) {
        const T g_r = grad_R[c * J + j] / s.denominator[j] + g_r_sum[j];
        g_a += g_r * R[c * J + j];
        grad_R[c * J + j] = g_r * a[c];
      }
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

  // The adjoint of the E-step that made R from the state (mu, sigma^2) of the iteration before:
  // writes the cotangents of that state's (mu, sigma^2, log a) and subtracts the votes' part
  // from grad_votes.
  void e_step_backward(const T* votes, const T* R, const T* grad_R, const T* total, const T* mu, const T* variance,
                       T* grad_mu, T* grad_variance, T* grad_log_a, T* grad_votes) const {
    const int64_t H = this->H(), J = this->J(), C = this->C();
    std::fill(grad_mu, grad_mu + J * H, T(0));
    std::fill(grad_variance, grad_variance + J * H, T(0));
    std::fill(grad_log_a, grad_log_a + J, T(0));
    std::vector<T> inverse(J * H);
    for (int64_t k = 0; k < J * H; ++k) inverse[k] = T(1) / variance[k];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const T rho = R[c * J + j];
        const T g_logit = grad_R[c * J + j] * rho - rho * total[c];
        const T* v = votes + (c * J + j) * H;
        const T* m = mu + j * H;
        const T* inv = inverse.data() + j * H;
        T* gm = grad_mu + j * H;
        T* gs = grad_variance + j * H;
        T* gv = grad_votes + (c * J + j) * H;
        for (int64_t h = 0; h < H; ++h) {
          const T diff = v[h] - m[h];
          const T weighted = g_logit * diff * inv[h];
          gm[h] += weighted;
          gs[h] += T(0.5) * g_logit * (diff * diff * inv[h] * inv[h] - inv[h]);
          gv[h] -= weighted;
        }
        grad_log_a[j] += g_logit;
      }
  }

  // From grad_votes (C, J, H): grad m (C, P, P) = sum_j grad V_cj W_jc^T, written, and
  // grad W_jc += M_c^T grad V_cj into grad_weight (J, C, P, P).
  void pose_and_weight_gradients(const T* m, const T* grad_votes, const T* weight, T* grad_m, T* grad_weight) const {
    const int64_t P = this->P(), H = this->H(), J = this->J(), C = this->C();
    for (int64_t c = 0; c < C; ++c) {
      const T* pose = m + c * H;
      T* gm = grad_m + c * H;
      for (int64_t j = 0; j < J; ++j) {
        const T* gv = grad_votes + (c * J + j) * H;
        const T* w = weight + (j * C + c) * H;
        T* gw = grad_weight + (j * C + c) * H;
        for (int64_t a = 0; a < P; ++a)
          for (int64_t b = 0; b < P; ++b) {
            T sum = gm[a * P + b];
            for (int64_t d = 0; d < P; ++d) sum += gv[a * P + d] * w[b * P + d];
            gm[a * P + b] = sum;
          }
        for (int64_t b = 0; b < P; ++b)
          for (int64_t a = 0; a < P; ++a)
            for (int64_t d = 0; d < P; ++d) gw[b * P + d] += pose[a * P + b] * gv[a * P + d];
      }
    }
  }
};

FASTCAPS_KERNELS_END
