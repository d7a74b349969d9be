// Fused CPU routing kernels: DESIGN.md sections 2-3 without materializing u_hat for the batch.
//
// This file picks, once per process, one instruction-set build of the kernels and registers
// it. Each build (isa_avx512.cpp, isa_avx2.cpp, isa_baseline.cpp) compiles the headers beside
// it (layout, rows, passes, squash, forward, backward, kernels; tuning.h holds the
// thresholds) for its own instruction set, at its own vector width: 16, 8 or 4 floats.
// FASTCAPS_CPU_ISA=avx512|avx2|baseline forces one (read once); by default the widest the CPU
// runs. fastcaps::_routing_cpu_isa() says which runs, _routing_cpu_isas() which could.
//
// Schemas are defined in Python (fastcaps/kernels/cpu/dynamic_routing.py); this file
// implements them for the CPU dispatch key. Arguments (all contiguous):
//   u       (B, I, Din)
//   weight  (J, I, D, Din)   the DigitCaps layout
//   bias    (J, D) or an empty tensor
//   s       (B, r, J, D)     each iteration's pre-squash sum, saved for the backward
//   leaky   leaky routing: each capsule's softmax over J has one more, zero logit
//
// SIMD across input capsules. Capsules are taken in blocks of kLanes (one vector of T: 16
// floats in the AVX-512 build, 8 in AVX2, 4 in the baseline; the last block is zero-padded),
// and every per-capsule quantity of a
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
// the forward's u_hat buffers are kept for the backward (`kept_u_hat`), which then reads them
// instead of recomputing u_hat and takes grad u and grad W from W in its own layout.
//
// Determinism: sums over capsules are taken per chunk of kChunkBlocks blocks and the chunk
// partials added in chunk order, and grad W is summed over the batch in batch order by the
// one thread that owns a block, so results are bitwise identical for any thread count.

#include "../common/builds.h"
#include "../common/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace fastcaps {

// What every instruction-set build exports (kernels.h defines them in fastcaps::<isa>).
#define FASTCAPS_DECLARE_BUILD(isa)                                                                         \
  namespace isa {                                                                                           \
  std::tuple<at::Tensor, at::Tensor> routing_cpu_forward(const at::Tensor& u, const at::Tensor& weight,      \
                                                         const at::Tensor& bias, int64_t iterations,        \
                                                         bool leaky, const at::Tensor& kept_u_hat);          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu_backward(                                      \
      const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight, const at::Tensor& s,         \
      const at::Tensor& kept_u_hat, int64_t iterations, bool detach_routing, bool leaky);                   \
  std::tuple<int64_t, int64_t> kept_layout(c10::ScalarType dtype);                                          \
  std::tuple<at::Tensor, at::Tensor> votes_cpu_forward(const at::Tensor& votes, const at::Tensor& bias,      \
                                                       int64_t iterations, bool leaky);                     \
  std::tuple<at::Tensor, at::Tensor> votes_cpu_backward(const at::Tensor& grad_v, const at::Tensor& votes,   \
                                                        const at::Tensor& s, int64_t iterations,            \
                                                        bool detach_routing, bool leaky);                   \
  }
#if defined(FASTCAPS_X86_BUILDS)
FASTCAPS_DECLARE_BUILD(avx512)
FASTCAPS_DECLARE_BUILD(avx2)
#endif
FASTCAPS_DECLARE_BUILD(baseline)
#undef FASTCAPS_DECLARE_BUILD

namespace {

// This op's entry points of one instruction-set build.
struct Build {
  decltype(&baseline::routing_cpu_forward) forward;
  decltype(&baseline::routing_cpu_backward) backward;
  decltype(&baseline::kept_layout) kept_layout;
  decltype(&baseline::votes_cpu_forward) votes_forward;
  decltype(&baseline::votes_cpu_backward) votes_backward;
};

// In the order of isa_builds() (common/isa.h): widest first.
const std::vector<Build>& builds() {
  static const std::vector<Build> all = {
#if defined(FASTCAPS_X86_BUILDS)
      {&avx512::routing_cpu_forward, &avx512::routing_cpu_backward, &avx512::kept_layout, &avx512::votes_cpu_forward,
       &avx512::votes_cpu_backward},
      {&avx2::routing_cpu_forward, &avx2::routing_cpu_backward, &avx2::kept_layout, &avx2::votes_cpu_forward,
       &avx2::votes_cpu_backward},
#endif
      {&baseline::routing_cpu_forward, &baseline::routing_cpu_backward, &baseline::kept_layout,
       &baseline::votes_cpu_forward, &baseline::votes_cpu_backward},
  };
  TORCH_INTERNAL_ASSERT(all.size() == isa_builds().size());
  return all;
}

// The build every call runs (common/isa.h: FASTCAPS_CPU_ISA's, else the widest the CPU runs),
// chosen on the first call and kept for the process, so that a forward and its backward agree
// on the layout of the kept u_hat. A forced build the CPU cannot run is an error, not a fallback.
const Build& chosen() {
  return builds()[chosen_isa_index()];
}

std::tuple<at::Tensor, at::Tensor> routing_cpu_forward(const at::Tensor& u, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t iterations, bool leaky,
                                                       const at::Tensor& kept_u_hat) {
  return chosen().forward(u, weight, bias, iterations, leaky, kept_u_hat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                                    const at::Tensor& weight, const at::Tensor& s,
                                                                    const at::Tensor& kept_u_hat, int64_t iterations,
                                                                    bool detach_routing, bool leaky) {
  return chosen().backward(grad_v, u, weight, s, kept_u_hat, iterations, detach_routing, leaky);
}

std::tuple<at::Tensor, at::Tensor> votes_cpu_forward(const at::Tensor& votes, const at::Tensor& bias,
                                                     int64_t iterations, bool leaky) {
  return chosen().votes_forward(votes, bias, iterations, leaky);
}

std::tuple<at::Tensor, at::Tensor> votes_cpu_backward(const at::Tensor& grad_v, const at::Tensor& votes,
                                                      const at::Tensor& s, int64_t iterations, bool detach_routing,
                                                      bool leaky) {
  return chosen().votes_backward(grad_v, votes, s, iterations, detach_routing, leaky);
}

// (lanes, samples) of the build that runs: the launcher and the op's fake tensor read the
// kept u_hat's size from here, so that they agree with the kernels whatever the vector width.
std::tuple<int64_t, int64_t> routing_cpu_kept_layout(c10::ScalarType dtype) {
  return chosen().kept_layout(dtype);
}

std::string routing_cpu_isa() {
  return chosen_isa();
}

std::vector<std::string> routing_cpu_isas() {
  std::vector<std::string> runnable;
  for (const IsaBuild& build : isa_builds())
    if (build.runs_here()) runnable.push_back(build.name);
  return runnable;
}

}  // namespace
}  // namespace fastcaps

TORCH_LIBRARY_FRAGMENT(fastcaps, m) {
  m.def("_routing_cpu_kept_layout(ScalarType dtype) -> (int, int)", &fastcaps::routing_cpu_kept_layout);
  m.def("_routing_cpu_isa() -> str", &fastcaps::routing_cpu_isa);
  m.def("_routing_cpu_isas() -> str[]", &fastcaps::routing_cpu_isas);
}

TORCH_LIBRARY_IMPL(fastcaps, CPU, m) {
  m.impl("routing_cpu_forward", &fastcaps::routing_cpu_forward);
  m.impl("routing_cpu_backward", &fastcaps::routing_cpu_backward);
  m.impl("votes_cpu_forward", &fastcaps::votes_cpu_forward);
  m.impl("votes_cpu_backward", &fastcaps::votes_cpu_backward);
}
