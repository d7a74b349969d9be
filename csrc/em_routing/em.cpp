// Fused CPU kernels for EM routing (fastcaps::em_routing's "cpu" backend): schedule.h says
// how the windows are swept, window.h what each sweep computes at a window. This file registers
// the instruction-set build that common/isa.h chose (the same as dynamic routing's) for the CPU
// dispatch key; the schemas are defined in Python (fastcaps/kernels/cpu/dynamic_routing.py).

#include "../common/builds.h"
#include "../common/isa.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace fastcaps {

#define FASTCAPS_DECLARE_BUILD(isa)                                                                            \
  namespace isa {                                                                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> em_cpu_forward(                                               \
      const at::Tensor& poses, const at::Tensor& activations, const at::Tensor& weight, const at::Tensor& offsets, \
      const at::Tensor& beta_u, const at::Tensor& beta_a, c10::ArrayRef<double> lambdas, int64_t per_sample,     \
      const at::Tensor& child_index, int64_t child_count, double eps, double variance_floor);                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_cpu_backward(                      \
      const at::Tensor& grad_mu, const at::Tensor& grad_a, const at::Tensor& poses, const at::Tensor& activations, \
      const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& beta_u, const at::Tensor& beta_a,   \
      const at::Tensor& state, c10::ArrayRef<double> lambdas, int64_t per_sample, const at::Tensor& child_index, \
      int64_t child_count, bool detach_routing, double eps, double variance_floor);                             \
  }
#if defined(FASTCAPS_X86_BUILDS)
FASTCAPS_DECLARE_BUILD(avx512)
FASTCAPS_DECLARE_BUILD(avx2)
#endif
FASTCAPS_DECLARE_BUILD(baseline)
#undef FASTCAPS_DECLARE_BUILD

namespace {

struct Build {
  decltype(&baseline::em_cpu_forward) forward;
  decltype(&baseline::em_cpu_backward) backward;
};

// In the order of isa_builds() (common/isa.h): widest first.
const Build& chosen() {
  static const std::vector<Build> all = {
#if defined(FASTCAPS_X86_BUILDS)
      {&avx512::em_cpu_forward, &avx512::em_cpu_backward},
      {&avx2::em_cpu_forward, &avx2::em_cpu_backward},
#endif
      {&baseline::em_cpu_forward, &baseline::em_cpu_backward},
  };
  TORCH_INTERNAL_ASSERT(all.size() == isa_builds().size());
  return all[chosen_isa_index()];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> em_cpu_forward(
    const at::Tensor& poses, const at::Tensor& activations, const at::Tensor& weight, const at::Tensor& offsets,
    const at::Tensor& beta_u, const at::Tensor& beta_a, c10::ArrayRef<double> lambdas, int64_t per_sample,
    const at::Tensor& child_index, int64_t child_count, double eps, double variance_floor) {
  return chosen().forward(poses, activations, weight, offsets, beta_u, beta_a, lambdas, per_sample, child_index,
                          child_count, eps, variance_floor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_cpu_backward(
    const at::Tensor& grad_mu, const at::Tensor& grad_a, const at::Tensor& poses, const at::Tensor& activations,
    const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& beta_u, const at::Tensor& beta_a,
    const at::Tensor& state, c10::ArrayRef<double> lambdas, int64_t per_sample, const at::Tensor& child_index,
    int64_t child_count, bool detach_routing, double eps, double variance_floor) {
  return chosen().backward(grad_mu, grad_a, poses, activations, weight, offsets, beta_u, beta_a, state, lambdas,
                           per_sample, child_index, child_count, detach_routing, eps, variance_floor);
}

}  // namespace
}  // namespace fastcaps

TORCH_LIBRARY_IMPL(fastcaps, CPU, m) {
  m.impl("em_cpu_forward", &fastcaps::em_cpu_forward);
  m.impl("em_cpu_backward", &fastcaps::em_cpu_backward);
}
