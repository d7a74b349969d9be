// EM routing over a call's windows: which window steps (window.h) each sweep runs, in which
// order, and how the per-child normalisation's sums across windows are taken between sweeps.
//
// per_window: each window routes on its own, so one task takes a window through every
// iteration with its votes formed once into the thread's buffer: the forward and the backward
// each form the votes once per window.
//
// per_child: a child's responsibilities are normalised over every slot that holds it, in all
// the windows of its sample, so the sums across windows are taken between sweeps over the
// windows (`group_normalisers`, `group_totals`: per sample, slots in order). Forward: one sweep
// per iteration; it forms the votes, takes R from the logits the sweep before left (C x J per
// window) and the normalisers summed between, runs the M-step and leaves the next logits. The
// backward first takes every iteration's logits and normalisers from the saved states (one sweep;
// the logits, (r - 1) C J per window, are kept), then one sweep for the last M-step and its
// adjoint, and one per earlier iteration t for the adjoint of the E-step of t + 1 followed by the
// M-step of t and its adjoint (the E-step adjoint needs the children's totals of grad R R, summed
// between sweeps). So the votes are formed r times in the forward and r + 1 times in the
// backward, against once each per window.
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

// A call: the per-window steps, the gathered inputs, the saved states and the per-child map.
template <typename T, int64_t P>
struct EMCall {
  static constexpr int64_t H = P * P;
  EMWindow<T, P> window;
  const T* poses;              // (N, C, P, P): each window's child poses
  const T* activations;        // (N, C)
  const int64_t* child_index;  // (per_sample, C): which child fills each slot; null per window
  int64_t child_count;         // distinct children of a sample (padding's index included)

  const EMShape& shape() const { return window.shape; }
  bool per_child() const { return child_index != nullptr; }
  int64_t N() const { return shape().windows; }
  int64_t C() const { return shape().children; }
  int64_t J() const { return shape().out_caps; }
  int64_t last() const { return shape().iterations - 1; }
  const T* poses_of(int64_t w) const { return poses + w * C() * H; }
  const T* activations_of(int64_t w) const { return activations + w * C(); }
  // The row of `state` (N, r - 1, J, 2H + 1) holding iteration t's parents at window w.
  int64_t state_row(int64_t w, int64_t t) const { return (w * last() + t) * J() * (2 * H + 1); }

  // R entering the first M-step at window w: 1/J, or 1/(J w_i) per child, w_i the slots that
  // hold child i in its sample.
  void initial(int64_t w, const std::vector<T>& slot_counts, T* R) const {
    const int64_t C = this->C(), J = this->J();
    for (int64_t c = 0; c < C; ++c) {
      const T share = per_child() ? T(1) / (slot_counts[(w % shape().per_sample) * C + c] * T(J)) : T(1) / T(J);
      std::fill(R + c * J, R + (c + 1) * J, share);
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

  // Per sample, each slot's log-normaliser from the slots' own (in place, `normaliser` N x C):
  // the logsumexp over every slot of the same child, shifted by that child's largest.
  void group_normalisers(T* normaliser) const {
    const int64_t slots = shape().per_sample * C(), samples = N() / shape().per_sample;
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
    const int64_t slots = shape().per_sample * C(), samples = N() / shape().per_sample;
    parallel_items(samples, [&] { return std::vector<T>(child_count); }, [&](int64_t sample, std::vector<T>& sum) {
      T* t = totals + sample * slots;
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t k = 0; k < slots; ++k) sum[child_index[k]] += t[k];
      for (int64_t k = 0; k < slots; ++k) t[k] = sum[child_index[k]];
    });
  }
};

// One thread's buffers for a window.
template <typename T, int64_t P>
struct WindowScratch {
  using vec = typename Pose<T, P>::vec;
  Aligned<vec> votes, grad_votes;
  std::vector<T> logits, responsibilities, grad_R, normaliser, totals, row;
  Parents<T, P> parents;
  MStep<T, P> step;
  Cotangents<T, P> cotangents;
  WindowScratch(int64_t children, int64_t out_caps, bool backward)
      : votes(children * out_caps), grad_votes(backward ? children * out_caps : 0), logits(children * out_caps),
        responsibilities(children * out_caps), grad_R(backward ? children * out_caps : 0), normaliser(children),
        totals(children), row(out_caps), parents(out_caps), step(children, out_caps), cotangents(out_caps) {}
};

// The per-window E-step into s.responsibilities: R from `parents`, normalised over each slot's
// parents (the window's logits and normalisers in s's buffers).
template <typename T, int64_t P>
void e_step_per_window(const EMWindow<T, P>& win, const Parents<T, P>& parents, WindowScratch<T, P>& s) {
  win.logits(s.votes.data(), parents, s.logits.data());
  win.slot_normalisers(s.logits.data(), s.normaliser.data(), s.row.data());
  win.responsibilities(s.logits.data(), s.normaliser.data(), s.responsibilities.data());
}

template <typename T, int64_t P>
WindowScratch<T, P> scratch_for(const EMCall<T, P>& call, bool backward) {
  return WindowScratch<T, P>(call.C(), call.J(), backward);
}

// Forward: mu (N, J, P, P) and log a (N, J) of the last iteration, state of the others.
template <typename T, int64_t P>
void em_forward_kernel(const EMCall<T, P>& call, T* out_mu, T* out_log_a, T* state) {
  using Lanes = Pose<T, P>;
  const EMWindow<T, P>& win = call.window;
  const int64_t N = call.N(), C = call.C(), J = call.J(), H = Lanes::entries, last = call.last();
  const std::vector<T> counts = call.slot_counts();
  auto finish = [&](int64_t w, int64_t t, const MStep<T, P>& step) {
    if (t < last) return step.store(state + call.state_row(w, t), J);
    for (int64_t j = 0; j < J; ++j) Lanes::store(out_mu + (w * J + j) * H, step.mu[j]);
    std::copy(step.log_a.begin(), step.log_a.end(), out_log_a + w * J);
  };
  auto make_scratch = [&] { return scratch_for(call, false); };
  if (!call.per_child()) {
    parallel_items(N, make_scratch, [&](int64_t w, WindowScratch<T, P>& s) {
      win.form_votes(call.poses_of(w), s.votes.data());
      call.initial(w, counts, s.responsibilities.data());
      for (int64_t t = 0; t <= last; ++t) {
        win.m_step(s.votes.data(), s.responsibilities.data(), call.activations_of(w), t, s.step);
        finish(w, t, s.step);
        if (t == last) break;
        e_step_per_window(win, s.step, s);
      }
    });
    return;
  }
  // Per child: the logits of the next iteration and the slots' normalisers wait between sweeps.
  std::vector<T> logits(N * C * J), normaliser(N * C);
  for (int64_t t = 0; t <= last; ++t) {
    parallel_items(N, make_scratch, [&](int64_t w, WindowScratch<T, P>& s) {
      win.form_votes(call.poses_of(w), s.votes.data());
      T* L = logits.data() + w * C * J;
      if (t == 0)
        call.initial(w, counts, s.responsibilities.data());
      else
        win.responsibilities(L, normaliser.data() + w * C, s.responsibilities.data());
      win.m_step(s.votes.data(), s.responsibilities.data(), call.activations_of(w), t, s.step);
      finish(w, t, s.step);
      if (t == last) return;
      win.logits(s.votes.data(), s.step, L);
      win.slot_normalisers(L, normaliser.data() + w * C, s.row.data());
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

  // body(w, stripe, state) for every window, each stripe's windows in order by one task.
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

// Backward: grad poses (N, C, P, P) and grad activations (N, C) of the gathered children,
// grad W (J, C, P, P), grad beta_u and beta_a (J), from the cotangents of mu (N, J, P, P) and
// of a = exp(log a) (N, J).
template <typename T, int64_t P>
void em_backward_kernel(const EMCall<T, P>& call, const T* grad_mu, const T* grad_a, const T* state, T* grad_m,
                        T* grad_acts, T* grad_weight, T* grad_beta_u, T* grad_beta_a) {
  using Lanes = Pose<T, P>;
  const EMWindow<T, P>& win = call.window;
  const int64_t N = call.N(), C = call.C(), J = call.J(), H = Lanes::entries, last = call.last();
  const std::vector<T> counts = call.slot_counts();
  const bool detach = win.options.detach_routing;
  StripeSums<T> sums(N, J * C * H, J);
  std::fill(grad_m, grad_m + N * C * H, T(0));
  std::fill(grad_acts, grad_acts + N * C, T(0));

  // Per child, from a first sweep: slot c's logits and normaliser of iteration t >= 1 at window w,
  // from the saved states, at [((t - 1) N + w) C (J)] (the normalisers summed over each child's
  // slots once for every iteration).
  const bool per_child = call.per_child();
  std::vector<T> saved_logits(per_child ? last * N * C * J : 0), normalisers(per_child ? last * N * C : 0);
  auto saved_logits_of = [&](int64_t w, int64_t t) { return saved_logits.data() + ((t - 1) * N + w) * C * J; };
  auto normaliser_of = [&](int64_t w, int64_t t) { return normalisers.data() + ((t - 1) * N + w) * C; };
  // R of iteration t at window w into s.responsibilities, and s.parents the state of t - 1 it
  // came from (t >= 1): the initial R, or the E-step (per window: from the logits again).
  auto responsibilities = [&](int64_t w, int64_t t, WindowScratch<T, P>& s) {
    T* R = s.responsibilities.data();
    if (t == 0) return call.initial(w, counts, R);
    s.parents.load(state + call.state_row(w, t - 1), J);
    if (per_child) return win.responsibilities(saved_logits_of(w, t), normaliser_of(w, t), R);
    e_step_per_window(win, s.parents, s);
  };
  // The M-step of iteration t at window w on s.responsibilities and its adjoint, from the
  // cotangents in s.cotangents (for t = last: the outputs'); grad R into s.grad_R.
  auto m_step_and_adjoint = [&](int64_t w, int64_t t, WindowScratch<T, P>& s, int64_t stripe) {
    const T* R = s.responsibilities.data();
    win.m_step(s.votes.data(), R, call.activations_of(w), t, s.step);
    Cotangents<T, P>& g = s.cotangents;
    if (t == last) {
      for (int64_t j = 0; j < J; ++j) {
        g.mu[j] = Lanes::load(grad_mu + (w * J + j) * H);
        g.variance[j] = typename Lanes::vec{};
        g.log_a[j] = grad_a[w * J + j] * std::exp(s.step.log_a[j]);
      }
    }
    win.m_step_backward(s.votes.data(), R, call.activations_of(w), t, s.step, g, s.grad_votes.data(),
                        grad_acts + w * C, sums.beta_u_of(stripe), sums.beta_a_of(stripe), s.grad_R.data());
  };
  auto start_window = [&](int64_t w, WindowScratch<T, P>& s) {
    win.form_votes(call.poses_of(w), s.votes.data());
    std::fill(s.grad_votes.data(), s.grad_votes.data() + C * J, typename Lanes::vec{});
  };
  auto finish_window = [&](int64_t w, WindowScratch<T, P>& s, int64_t stripe) {
    win.pose_and_weight_gradients(call.poses_of(w), s.grad_votes.data(), grad_m + w * C * H, sums.weight_of(stripe));
  };
  auto make_scratch = [&] { return scratch_for(call, true); };

  if (!call.per_child()) {
    sums.sweep(make_scratch, [&](int64_t w, int64_t stripe, WindowScratch<T, P>& s) {
      start_window(w, s);
      for (int64_t t = last; t >= 0; --t) {
        responsibilities(w, t, s);
        m_step_and_adjoint(w, t, s, stripe);
        if (t == 0 || detach) break;
        win.slot_totals(s.responsibilities.data(), s.grad_R.data(), s.totals.data());
        win.e_step_backward(s.votes.data(), s.responsibilities.data(), s.grad_R.data(), s.totals.data(), s.parents,
                            s.cotangents, s.grad_votes.data());
      }
      finish_window(w, s, stripe);
    });
    sums.total(grad_weight, grad_beta_u, grad_beta_a);
    return;
  }

  // Per child. Between sweeps, per window: grad R of the M-step just taken, and the slots' totals
  // of grad R R.
  std::vector<T> grad_R(N * C * J), totals(N * C);
  const int64_t first_iteration = detach ? last : 1;  // with detach, only the last M-step's R is needed
  if (last > 0) {
    parallel_items(N, [&] { return scratch_for(call, false); }, [&](int64_t w, WindowScratch<T, P>& s) {
      win.form_votes(call.poses_of(w), s.votes.data());
      for (int64_t t = first_iteration; t <= last; ++t) {
        s.parents.load(state + call.state_row(w, t - 1), J);
        win.logits(s.votes.data(), s.parents, saved_logits_of(w, t));
        win.slot_normalisers(saved_logits_of(w, t), normaliser_of(w, t), s.row.data());
      }
    });
    for (int64_t t = first_iteration; t <= last; ++t) call.group_normalisers(normaliser_of(0, t));
  }
  // The M-step of t at window w and its adjoint; its grad R and totals kept for the E-step adjoint.
  auto m_step_part = [&](int64_t w, int64_t t, WindowScratch<T, P>& s, int64_t stripe) {
    responsibilities(w, t, s);
    m_step_and_adjoint(w, t, s, stripe);
    std::copy(s.grad_R.begin(), s.grad_R.end(), grad_R.begin() + w * C * J);
    win.slot_totals(s.responsibilities.data(), s.grad_R.data(), totals.data() + w * C);
  };
  sums.sweep(make_scratch, [&](int64_t w, int64_t stripe, WindowScratch<T, P>& s) {
    start_window(w, s);
    m_step_part(w, last, s, stripe);
    finish_window(w, s, stripe);
  });
  for (int64_t t = last; t >= 1 && !detach; --t) {
    call.group_totals(totals.data());
    sums.sweep(make_scratch, [&](int64_t w, int64_t stripe, WindowScratch<T, P>& s) {
      start_window(w, s);
      responsibilities(w, t, s);  // R of t again, and s.parents the state of t - 1
      win.e_step_backward(s.votes.data(), s.responsibilities.data(), grad_R.data() + w * C * J, totals.data() + w * C,
                          s.parents, s.cotangents, s.grad_votes.data());
      m_step_part(w, t - 1, s, stripe);
      finish_window(w, s, stripe);
    });
  }
  sums.total(grad_weight, grad_beta_u, grad_beta_a);
}

FASTCAPS_KERNELS_END
