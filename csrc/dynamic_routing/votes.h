// Routing from given votes (fastcaps::route_votes) on the dynamic-routing kernels: the votes
// are u_hat, so where the dense passes predict u_hat into a sample's buffer these transpose
// the sample's votes into it (the lane layout the passes read). Forward: forward_kernel's r
// passes. Backward: the dense backward's prologue, phase A's passes and phase B's
// g = dL/du_hat (prediction_gradients), which is grad votes, turned back to one row per child;
// fused per sample (votes_backward_kernel).

#pragma once

#include "../common/parallel.h"
#include "backward.h"
#include "forward.h"
#include "layout.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// The passes' view of a votes call: no W and no packed inputs (in_dim 1 only sizes
// Scratch's unused buffers); the passes that predict transpose each block of the votes into
// the sample's u_hat buffer instead (sweep_chunk), so the votes are read where they lie and
// no lane-layout copy of them is made for the call. Samples in parallel where there are
// enough of them.
template <typename T>
Packed<T> votes_packed(const Dims& d, const T* votes) {
  return Packed<T>{d, d.jd(), d.blocks<T>(), d.chunks<T>(), nullptr, {}, {}, LaneArray<T>(0), LaneArray<T>(0),
                   samples_in_parallel(d.batch), votes};
}

template <typename T>
void votes_forward_kernel(const Packed<T>& p, const T* bias, T* v_out, T* s_out) {
  forward_kernel<T>(p, bias, v_out, s_out, /*kept_u_hat=*/nullptr);
}

// One sample (row) at a time per thread, whatever the batch: its votes are transposed into
// its u_hat buffer by phase A's first pass, the reverse passes read them there and keep every
// iteration's couplings and logit gradients, and phase B takes g from those and the u_hat
// buffer: the votes are read from memory once and no coupling is computed twice. (With no
// reverse pass, detached or r = 1, phase B transposes each block itself and computes its
// couplings, prediction_gradients.) A sample's state and g depend on that sample alone: any
// split over samples gives the same bits, and they are the bits of the unfused schedule.
template <typename T>
void votes_backward_kernel(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach_routing, T* grad_votes,
                           T* grad_bias) {
  BackwardState<T> state = backward_prologue(p, grad_v, s_all, detach_routing);
  ReversePasses<T> phase_a(p, state, s_all, /*predict_first=*/true);
  const Dims rows = votes_rows(p.d);
  const int64_t steps = phase_a.steps(), jd = p.jd, J = p.d.out_caps, r = p.d.iterations;
  const int64_t per_iteration = p.blocks * J;  // c or delta of one iteration, every block
  struct RowState {
    LaneArray<T> uh, couplings, logit_grads;  // [t][blk][j]
    std::vector<T> partials;
    Scratch<T> scratch;
  };
  const auto make_state = [&] {
    const int64_t kept = steps > 0 ? r * per_iteration : 0;
    RowState row{LaneArray<T>(steps > 0 ? p.blocks * jd : jd), LaneArray<T>(kept), LaneArray<T>(kept),
                 std::vector<T>(p.chunks * jd), Scratch<T>(p)};
    // Iteration 0's couplings: uniform, as couplings() forms them (no pass computes them).
    std::fill(row.couplings.data(), row.couplings.data() + (steps > 0 ? per_iteration : 0),
              uniform_coupling<T>(J, p.d.leaky));
    return row;
  };
  parallel_items(p.d.batch, make_state, [&](int64_t b, RowState& row) {
    Vec<T>* uh = row.uh.data();
    const auto pass_of = [&](int64_t sample, int64_t k, int64_t chunk) {
      Pass<T> pass = phase_a.pass(sample, k, chunk);
      const int64_t t = r - 1 - k;
      pass.kept_weights = row.logit_grads.data() + t * per_iteration;
      pass.kept_couplings = row.couplings.data() + t * per_iteration;
      return pass;
    };
    const auto finish = [&](int64_t sample, int64_t k, const T* partials) { phase_a.finish(sample, k, partials); };
    tile_passes(p, steps, pass_of, finish, b, 1, uh, row.partials.data(), row.scratch);
    Vec<T>* g = row.scratch.row_grad.data();
    for (int64_t blk = 0; blk < p.blocks; ++blk) {
      if (steps > 0) {
        gradients_from_couplings(p.d, state, b, row.couplings.data() + blk * J, row.logit_grads.data() + blk * J,
                                 per_iteration, g);
      } else {
        pack_input_block(rows, p.votes, b, blk, uh);
        prediction_gradients(p.d, state, b, uh, row.scratch, g);
      }
      unpack_input_block(rows, g, b, blk, grad_votes);
    }
  });
  bias_gradient(state, p.d.batch, grad_bias);
}

FASTCAPS_KERNELS_END
