// EM routing over a call's windows: which window steps (window.h) each sweep runs, in which
// order, and how the per-child normalisation's sums across windows are taken between sweeps.
//
// per_window: each window routes on its own, so one task takes a window through every
// iteration with its votes formed once into the thread's buffer: the forward and the backward
// each form the votes once per window.
//
// per_child: a child's responsibilities are normalised over every slot that holds it, in all
// the windows of its sample, so each iteration is a sweep over the windows and the sums across
// windows are taken between sweeps (`group_normalisers`, `group_totals`: per sample, slots in
// order). Forward: one sweep per iteration, which forms the votes, takes R from the logits the
// sweep before stored and the normalisers between them, runs the M-step, and stores the next
// logits; so the votes are formed once per iteration (r times, against once per window), and the
// logits (C x J per window) wait in memory between sweeps. Backward: a sweep for the last
// iteration's logits, then per iteration t a sweep for the M-step and its adjoint and, for t > 0,
// one for the E-step's adjoint (which also makes the logits of t - 1): 2r votes formations.
//
// Determinism: every window is computed by one thread in a fixed order. grad W and grad beta
// are summed per stripe (a fixed range of windows, kStripes of them whatever the thread
// count), each stripe by one task in window order, and the stripes added in stripe order.

#pragma once

#include "../common/parallel.h"
#include "window.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// Ranges of windows whose grad W and grad beta are summed apart, then added in order: enough
// tasks for the threads of a CPU, few enough that their partial grad W stay small.
constexpr int64_t kStripes = 16;

// A call: the per-window steps, the gathered inputs, and the per-child map.
template <typename T, int64_t kSide>
struct EMCall {
  EMWindow<T, kSide> window;
  const T* poses;               // (N, C, P, P): each window's child poses
  const T* activations;         // (N, C)
  const T* weight;              // (J, C, P, P)
  const int64_t* child_index;   // (per_sample, C): which child fills each slot; null per window
  int64_t child_count;          // distinct children of a sample (padding's index included)

  const EMShape<kSide>& shape() const { return window.shape; }
  bool per_child() const { return child_index != nullptr; }
  int64_t C() const { return shape().children; }
  int64_t J() const { return shape().out_caps; }
  int64_t H() const { return shape().entries(); }
  const T* poses_of(int64_t w) const { return poses + w * C() * H(); }
  const T* activations_of(int64_t w) const { return activations + w * C(); }

  // R entering the first M-step at window w: 1/J, or 1/(J w_i) per child, w_i the slots that
  // hold child i in its sample.
  void initial(int64_t w, const std::vector<T>& slot_counts, T* R) const {
    const int64_t C = this->C(), J = this->J();
    for (int64_t c = 0; c < C; ++c) {
      const T share = per_child() ? T(1) / (slot_counts[(w % shape().per_sample) * C + c] * T(J)) : T(1) / T(J);
      for (int64_t j = 0; j < J; ++j) R[c * J + j] = share;
    }
  }

  // For each slot of a sample, how many slots hold its child (at least 1).
  std::vector<T> slot_counts() const {
    std::vector<T> counts;
    if (!per_child()) return counts;
    const int64_t slots = shape().per_sample * C();
    std::vector<int64_t> per_child_count(child_count, 0);
    for (int64_t k = 0; k < slots; ++k) ++per_child_count[child_index[k]];
    counts.resize(slots);
    for (int64_t k = 0; k < slots; ++k) counts[k] = T(std::max<int64_t>(1, per_child_count[child_index[k]]));
    return counts;
  }

  // Per sample, each slot's log-normaliser from the slots' own (in place): the logsumexp over
  // every slot of the same child, shifted by that child's largest.
  void group_normalisers(T* normaliser) const {
    const int64_t slots = shape().per_sample * C(), samples = shape().windows / shape().per_sample;
    parallel_items(samples, [&] { return std::vector<T>(2 * child_count); }, [&](int64_t sample, std::vector<T>& acc) {
      T* n = normaliser + sample * slots;
      T* largest = acc.data();
      T* total = acc.data() + child_count;
      std::fill(largest, largest + child_count, -std::numeric_limits<T>::infinity());
      std::fill(total, total + child_count, T(0));
      for (int64_t k = 0; k < slots; ++k) largest[child_index[k]] = std::max(largest[child_index[k]], n[k]);
      for (int64_t k = 0; k < slots; ++k) total[child_index[k]] += std::exp(n[k] - largest[child_index[k]]);
      for (int64_t k = 0; k < slots; ++k) n[k] = largest[child_index[k]] + std::log(total[child_index[k]]);
    });
  }

  // Per sample, each slot's total replaced by the sum over every slot of the same child.
  void group_totals(T* totals) const {
    const int64_t slots = shape().per_sample * C(), samples = shape().windows / shape().per_sample;
    parallel_items(samples, [&] { return std::vector<T>(child_count); }, [&](int64_t sample, std::vector<T>& sum) {
      T* t = totals + sample * slots;
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t k = 0; k < slots; ++k) sum[child_index[k]] += t[k];
      for (int64_t k = 0; k < slots; ++k) t[k] = sum[child_index[k]];
    });
  }
};

// One thread's buffers for a window.
template <typename T>
struct WindowScratch {
  std::vector<T> votes, rows, logits, responsibilities, grad_votes, grad_R, normaliser, totals, terms;
  MStep<T> step;
  WindowScratch(int64_t children, int64_t out_caps, int64_t side, bool backward)
      : votes(children * out_caps * side * side), rows(side * side * side), logits(children * out_caps),
        responsibilities(children * out_caps), grad_votes(backward ? children * out_caps * side * side : 0),
        grad_R(backward ? children * out_caps : 0), normaliser(children), totals(children), terms(side * side),
        step(out_caps, side * side) {}
};

template <typename T, int64_t kSide>
WindowScratch<T> scratch_for(const EMCall<T, kSide>& call, bool backward) {
  return WindowScratch<T>(call.C(), call.J(), call.shape().side(), backward);
}

// The parents' state (mu | sigma^2 | log a) of iteration t at window w, in `state` (N, r - 1, J, 2H + 1).
template <typename T>
struct StateView {
  T* base;
  int64_t per_window, out_caps, entries;
  T* at(int64_t w, int64_t t) const { return base + w * per_window + t * out_caps * (2 * entries + 1); }
  T* mu(int64_t w, int64_t t) const { return at(w, t); }
  T* variance(int64_t w, int64_t t) const { return at(w, t) + out_caps * entries; }
  T* log_a(int64_t w, int64_t t) const { return at(w, t) + 2 * out_caps * entries; }
};

template <typename T, int64_t kSide>
StateView<T> state_view(const EMCall<T, kSide>& call, T* state) {
  const int64_t r = call.shape().iterations;
  return StateView<T>{state, (r - 1) * call.shape().state(), call.J(), call.H()};
}

template <typename T>
void store_state(const MStep<T>& step, T* mu, T* variance, T* log_a) {
  std::copy(step.mu.begin(), step.mu.end(), mu);
  std::copy(step.variance.begin(), step.variance.end(), variance);
  std::copy(step.log_a.begin(), step.log_a.end(), log_a);
}

// Forward: mu (N, J, H) and log a (N, J) of the last iteration, state of the others.
template <typename T, int64_t kSide>
void em_forward_kernel(const EMCall<T, kSide>& call, T* out_mu, T* out_log_a, T* state) {
  const EMWindow<T, kSide>& win = call.window;
  const int64_t N = call.shape().windows, C = call.C(), J = call.J(), H = call.H(), last = call.shape().iterations - 1;
  const StateView<T> states = state_view(call, state);
  const std::vector<T> counts = call.slot_counts();
  auto finish = [&](int64_t w, int64_t t, const MStep<T>& step) {
    if (t == last) {
      std::copy(step.mu.begin(), step.mu.end(), out_mu + w * J * H);
      std::copy(step.log_a.begin(), step.log_a.end(), out_log_a + w * J);
    } else {
      store_state(step, states.mu(w, t), states.variance(w, t), states.log_a(w, t));
    }
  };
  auto make_scratch = [&] { return scratch_for(call, false); };
  if (!call.per_child()) {
    parallel_items(N, make_scratch, [&](int64_t w, WindowScratch<T>& s) {
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      call.initial(w, counts, s.responsibilities.data());
      for (int64_t t = 0; t <= last; ++t) {
        win.m_step(s.votes.data(), s.responsibilities.data(), call.activations_of(w), t, s.step);
        finish(w, t, s.step);
        if (t == last) break;
        win.logits(s.votes.data(), s.step.mu.data(), s.step.variance.data(), s.step.log_a.data(),
                   s.responsibilities.data(), s.terms.data());
        win.slot_normalisers(s.responsibilities.data(), s.normaliser.data());
        win.responsibilities(s.responsibilities.data(), s.normaliser.data());
      }
    });
    return;
  }
  // Per child: the logits of the next iteration and the slots' normalisers wait between sweeps.
  std::vector<T> logits(N * C * J), normaliser(N * C);
  for (int64_t t = 0; t <= last; ++t) {
    parallel_items(N, make_scratch, [&](int64_t w, WindowScratch<T>& s) {
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      T* R = logits.data() + w * C * J;  // this iteration's R replaces the logits it came from
      if (t == 0)
        call.initial(w, counts, R);
      else
        win.responsibilities(R, normaliser.data() + w * C);
      win.m_step(s.votes.data(), R, call.activations_of(w), t, s.step);
      finish(w, t, s.step);
      if (t == last) return;
      win.logits(s.votes.data(), s.step.mu.data(), s.step.variance.data(), s.step.log_a.data(), R, s.terms.data());
      win.slot_normalisers(R, normaliser.data() + w * C);
    });
    if (t < last) call.group_normalisers(normaliser.data());
  }
}

// grad W and grad beta, summed per stripe of windows and then in stripe order.
template <typename T>
struct StripeSums {
  int64_t stripes, windows, weight_size, out_caps;
  std::vector<T> weight, beta_u, beta_a;
  StripeSums(int64_t windows_, int64_t weight_size_, int64_t out_caps_)
      : stripes(std::min(kStripes, std::max<int64_t>(windows_, 1))), windows(windows_), weight_size(weight_size_),
        out_caps(out_caps_), weight(stripes * weight_size, T(0)), beta_u(stripes * out_caps, T(0)),
        beta_a(stripes * out_caps, T(0)) {}
  int64_t first(int64_t stripe) const { return stripe * windows / stripes; }
  T* weight_of(int64_t stripe) { return weight.data() + stripe * weight_size; }
  T* beta_u_of(int64_t stripe) { return beta_u.data() + stripe * out_caps; }
  T* beta_a_of(int64_t stripe) { return beta_a.data() + stripe * out_caps; }

  // body(w, stripe) for every window, each stripe's windows in order by one task.
  template <typename MakeState, typename Body>
  void sweep(const MakeState& make_state, const Body& body) {
    parallel_items(stripes, make_state, [&](int64_t stripe, auto& state) {
      for (int64_t w = first(stripe); w < first(stripe + 1); ++w) body(w, stripe, state);
    });
  }

  // The stripes' sums, added in stripe order.
  void total(T* grad_weight, T* grad_beta_u, T* grad_beta_a) const {
    const int64_t block = 4096;
    parallel_items((weight_size + block - 1) / block, [] { return 0; }, [&](int64_t b, int) {
      for (int64_t k = b * block; k < std::min(weight_size, (b + 1) * block); ++k) {
        T sum = 0;
        for (int64_t s = 0; s < stripes; ++s) sum += weight[s * weight_size + k];
        grad_weight[k] = sum;
      }
    });
    for (int64_t j = 0; j < out_caps; ++j) {
      T u = 0, a = 0;
      for (int64_t s = 0; s < stripes; ++s) {
        u += beta_u[s * out_caps + j];
        a += beta_a[s * out_caps + j];
      }
      grad_beta_u[j] = u;
      grad_beta_a[j] = a;
    }
  }
};

// The cotangents of a window's (mu, sigma^2, log a) flowing back into iteration t's M-step.
template <typename T>
struct Cotangents {
  std::vector<T> mu, variance, log_a;
  Cotangents(int64_t out_caps, int64_t entries) : mu(out_caps * entries), variance(out_caps * entries), log_a(out_caps) {}
};

// Backward: grad poses (N, C, P, P) and grad activations (N, C) of the gathered children,
// grad W (J, C, P, P), grad beta_u and beta_a (J), from the cotangents of mu (N, J, H) and of
// a = exp(log a) (N, J).
template <typename T, int64_t kSide>
void em_backward_kernel(const EMCall<T, kSide>& call, const T* grad_mu, const T* grad_a, const T* state, T* grad_m,
                        T* grad_acts, T* grad_weight, T* grad_beta_u, T* grad_beta_a) {
  const EMWindow<T, kSide>& win = call.window;
  const int64_t N = call.shape().windows, C = call.C(), J = call.J(), H = call.H(), last = call.shape().iterations - 1;
  const StateView<T> states = state_view(call, const_cast<T*>(state));
  const std::vector<T> counts = call.slot_counts();
  const bool detach = win.options.detach_routing;
  StripeSums<T> sums(N, J * C * H, J);
  std::fill(grad_m, grad_m + N * C * H, T(0));
  std::fill(grad_acts, grad_acts + N * C, T(0));

  // The window's cotangents entering the last M-step: of mu as given, of log a = a * g_a.
  auto last_cotangents = [&](int64_t w, const MStep<T>& step, Cotangents<T>& g) {
    std::copy(grad_mu + w * J * H, grad_mu + (w + 1) * J * H, g.mu.begin());
    std::fill(g.variance.begin(), g.variance.end(), T(0));
    for (int64_t j = 0; j < J; ++j) g.log_a[j] = grad_a[w * J + j] * std::exp(step.log_a[j]);
  };
  // The M-step of iteration t at window w on R and its adjoint; grad R into s.grad_R.
  auto m_step_and_adjoint = [&](int64_t w, int64_t t, const T* R, Cotangents<T>& g, WindowScratch<T>& s,
                                int64_t stripe) {
    win.m_step(s.votes.data(), R, call.activations_of(w), t, s.step);
    if (t == last) last_cotangents(w, s.step, g);
    win.m_step_backward(s.votes.data(), R, call.activations_of(w), t, s.step, g.mu.data(), g.variance.data(),
                        g.log_a.data(), s.grad_votes.data(), grad_acts + w * C, sums.beta_u_of(stripe),
                        sums.beta_a_of(stripe), s.grad_R.data());
  };
  auto make_state = [&] { return std::make_pair(scratch_for(call, true), Cotangents<T>(J, H)); };

  if (!call.per_child()) {
    sums.sweep(make_state, [&](int64_t w, int64_t stripe, auto& state_pair) {
      WindowScratch<T>& s = state_pair.first;
      Cotangents<T>& g = state_pair.second;
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      std::fill(s.grad_votes.begin(), s.grad_votes.end(), T(0));
      T* R = s.responsibilities.data();
      for (int64_t t = last; t >= 0; --t) {
        if (t == 0) {
          call.initial(w, counts, R);
        } else {
          win.logits(s.votes.data(), states.mu(w, t - 1), states.variance(w, t - 1), states.log_a(w, t - 1), R,
                     s.terms.data());
          win.slot_normalisers(R, s.normaliser.data());
          win.responsibilities(R, s.normaliser.data());
        }
        m_step_and_adjoint(w, t, R, g, s, stripe);
        if (t == 0 || detach) break;
        win.slot_totals(R, s.grad_R.data(), s.totals.data());
        win.e_step_backward(s.votes.data(), R, s.grad_R.data(), s.totals.data(), states.mu(w, t - 1),
                            states.variance(w, t - 1), g.mu.data(), g.variance.data(), g.log_a.data(),
                            s.grad_votes.data());
      }
      win.pose_and_weight_gradients(call.poses_of(w), s.grad_votes.data(), call.weight, grad_m + w * C * H,
                                    sums.weight_of(stripe));
    });
    sums.total(grad_weight, grad_beta_u, grad_beta_a);
    return;
  }

  // Per child. Between sweeps, per window: R of iteration t, its cotangent, the logits and the
  // slots' normalisers and totals, and the cotangents flowing back into iteration t - 1.
  std::vector<T> responsibilities(N * C * J), grad_R(N * C * J), normaliser(N * C), totals(N * C);
  std::vector<T> carried(N * J * (2 * H + 1));
  auto carried_of = [&](int64_t w, Cotangents<T>& g) {
    const T* c = carried.data() + w * J * (2 * H + 1);
    std::copy(c, c + J * H, g.mu.begin());
    std::copy(c + J * H, c + 2 * J * H, g.variance.begin());
    std::copy(c + 2 * J * H, c + 2 * J * H + J, g.log_a.begin());
  };
  auto carry = [&](int64_t w, const Cotangents<T>& g) {
    T* c = carried.data() + w * J * (2 * H + 1);
    std::copy(g.mu.begin(), g.mu.end(), c);
    std::copy(g.variance.begin(), g.variance.end(), c + J * H);
    std::copy(g.log_a.begin(), g.log_a.end(), c + 2 * J * H);
  };
  // The logits of iteration t (from the state of t - 1) into `responsibilities`, and the slots'
  // normalisers, for every window; then summed over each child's slots.
  auto logits_sweep_body = [&](int64_t w, int64_t t, WindowScratch<T>& s) {
    T* L = responsibilities.data() + w * C * J;
    win.logits(s.votes.data(), states.mu(w, t - 1), states.variance(w, t - 1), states.log_a(w, t - 1), L,
               s.terms.data());
    win.slot_normalisers(L, normaliser.data() + w * C);
  };
  if (last > 0) {
    parallel_items(N, [&] { return scratch_for(call, false); }, [&](int64_t w, WindowScratch<T>& s) {
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      logits_sweep_body(w, last, s);
    });
    call.group_normalisers(normaliser.data());
  }
  for (int64_t t = last; t >= 0; --t) {
    sums.sweep(make_state, [&](int64_t w, int64_t stripe, auto& state_pair) {
      WindowScratch<T>& s = state_pair.first;
      Cotangents<T>& g = state_pair.second;
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      std::fill(s.grad_votes.begin(), s.grad_votes.end(), T(0));
      T* R = responsibilities.data() + w * C * J;
      if (t == 0)
        call.initial(w, counts, R);
      else
        win.responsibilities(R, normaliser.data() + w * C);
      if (t < last) carried_of(w, g);
      m_step_and_adjoint(w, t, R, g, s, stripe);
      std::copy(s.grad_R.begin(), s.grad_R.end(), grad_R.begin() + w * C * J);
      win.slot_totals(R, s.grad_R.data(), totals.data() + w * C);
      win.pose_and_weight_gradients(call.poses_of(w), s.grad_votes.data(), call.weight, grad_m + w * C * H,
                                    sums.weight_of(stripe));
    });
    if (t == 0 || detach) break;
    call.group_totals(totals.data());
    sums.sweep(make_state, [&](int64_t w, int64_t stripe, auto& state_pair) {
      WindowScratch<T>& s = state_pair.first;
      Cotangents<T>& g = state_pair.second;
      win.form_votes(call.poses_of(w), s.votes.data(), s.rows.data());
      std::fill(s.grad_votes.begin(), s.grad_votes.end(), T(0));
      win.e_step_backward(s.votes.data(), responsibilities.data() + w * C * J, grad_R.data() + w * C * J,
                          totals.data() + w * C, states.mu(w, t - 1), states.variance(w, t - 1), g.mu.data(),
                          g.variance.data(), g.log_a.data(), s.grad_votes.data());
      carry(w, g);
      win.pose_and_weight_gradients(call.poses_of(w), s.grad_votes.data(), call.weight, grad_m + w * C * H,
                                    sums.weight_of(stripe));
      if (t - 1 > 0) logits_sweep_body(w, t - 1, s);
    });
    if (t - 1 > 0) call.group_normalisers(normaliser.data());
  }
  sums.total(grad_weight, grad_beta_u, grad_beta_a);
}

FASTCAPS_KERNELS_END
