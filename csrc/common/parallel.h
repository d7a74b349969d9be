// Work shared out one item at a time among the threads of ATen's pool.

#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include "simd.h"

FASTCAPS_KERNELS_BEGIN

// body(item, state) for every item in [0, count), each item taken by whichever thread is free
// next; state = make_state() once per thread (its scratch buffers). at::parallel_for splits
// a range in equal halves up front, and on a shared VM whose cores run at different speeds
// the faster thread then waited for the other (2 threads ran 1.8x faster than one, on 2
// vCPUs, Zen 3). An item's arithmetic must not depend on the thread that runs it or on the
// order the items run in, so results stay bitwise the same for any thread count. Not for
// items that read neighbouring stretches of memory: phase B over blocks of W, taken this
// way, ran 1.3x slower at B = 2 (each thread's reads of W no longer in order) and no faster
// at B = 128 (benchmarks/ab_kernels.py).
template <typename MakeState, typename Body>
void parallel_items(int64_t count, const MakeState& make_state, const Body& body) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) body(item, state);
  });
}

FASTCAPS_KERNELS_END
