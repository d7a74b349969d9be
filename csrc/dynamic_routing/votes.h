// Routing from given votes (fastcaps::route_votes) on the dynamic-routing kernels: the votes
// are u_hat, so they are put in the lane layout the passes read (the layout of the kept u_hat)
// and no pass predicts. Forward: forward_kernel's r passes. Backward: the same prologue and
// phase A as the dense backward (routing_state_backward), then per sample and block
// g = dL/du_hat (prediction_gradients), which is grad votes, turned back to one row per child.

#pragma once

#include "backward.h"
#include "forward.h"
#include "layout.h"

#include <ATen/Parallel.h>

#include <cstdint>

FASTCAPS_KERNELS_BEGIN

// votes (N, I, J, D) as rows of u with J*D "input features": pack_input_block and
// unpack_input_block then move them into and out of the lane layout.
inline Dims votes_rows(const Dims& d) {
  Dims rows = d;
  rows.in_dim = d.jd();
  return rows;
}

// The passes' view of a votes call: no W and no packed inputs (nothing predicts; in_dim 1
// only sizes Scratch's unused buffers), samples in parallel where there are enough of them.
template <typename T>
Packed<T> votes_packed(const Dims& d) {
  return Packed<T>{d, d.jd(), d.blocks<T>(), d.chunks<T>(), nullptr, {}, {}, LaneArray<T>(0), LaneArray<T>(0),
                   samples_in_parallel(d.batch)};
}

// lanes[(b * blocks + blk) * jd + k][l] = votes[b, blk * L + l, k], zero past the last child.
template <typename T>
LaneArray<T> votes_in_lanes(const Packed<T>& p, const T* votes) {
  const Dims rows = votes_rows(p.d);
  LaneArray<T> lanes(p.d.batch * p.blocks * p.jd);
  at::parallel_for(0, p.d.batch * p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item)
      pack_input_block(rows, votes, item / p.blocks, item % p.blocks, lanes.data() + item * p.jd);
  });
  return lanes;
}

template <typename T>
void votes_forward_kernel(const Packed<T>& p, const T* votes, const T* bias, T* v_out, T* s_out) {
  LaneArray<T> lanes = votes_in_lanes(p, votes);
  forward_kernel<T>(p, bias, v_out, s_out, lanes.data(), /*u_hat_given=*/true);
}

template <typename T>
void votes_backward_kernel(const Packed<T>& p, const T* grad_v, const T* s_all, bool detach_routing, const T* votes,
                           T* grad_votes, T* grad_bias) {
  LaneArray<T> lanes = votes_in_lanes(p, votes);
  const BackwardState<T> state = routing_state_backward(p, grad_v, s_all, detach_routing, lanes.data(), grad_bias);
  const Dims rows = votes_rows(p.d);
  // Each sample's g depends on its own state only: any split over samples gives the same bits.
  at::parallel_for(0, p.d.batch, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(p);
    Vec<T>* g = scratch.row_grad.data();
    for (int64_t b = begin; b < end; ++b)
      for (int64_t blk = 0; blk < p.blocks; ++blk) {
        prediction_gradients(p.d, state, b, lanes.data() + (b * p.blocks + blk) * p.jd, scratch, g);
        unpack_input_block(rows, g, b, blk, grad_votes);
      }
  });
}

FASTCAPS_KERNELS_END
