// The entry points of one instruction-set build of the C++ EM-routing kernels: the CPU
// implementations of fastcaps::em_cpu_forward and em_cpu_backward, in fastcaps::FASTCAPS_ISA.
// Included once, by that build's translation unit (isa_*.cpp); em.cpp picks a build at run time
// (the same one as dynamic routing's, common/isa.h) and registers it.
//
// Arguments (contiguous, one floating dtype; the launcher, fastcaps/kernels/cpu/em_routing.py,
// gathers each window's children):
//   poses        (N, C, P, P)   the child poses of N windows of C slots each
//   activations  (N, C)
//   weight       (J, C, P, P)   W of each slot (the class layer's, repeated per position)
//   offsets      (C, P, P) or empty: added to every vote of a slot (coordinate addition)
//   beta_u, beta_a (J)
//   lambdas      one inverse temperature per iteration
//   per_sample   windows of one sample (N is a multiple)
//   child_index  (per_sample, C) int64, which child of the sample fills each slot (the
//                per-child normalisation), or empty (per window); child_count its range
//   state        (N, r - 1, J, 2 P^2 + 1): [mu | sigma^2 | log a] of every iteration but the last

#pragma once

#include "schedule.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

FASTCAPS_KERNELS_BEGIN

// The largest pose side the kernels are compiled for (P^2 = 64 lanes).
constexpr int64_t kLargestSide = 8;

struct EMArgs {
  int64_t windows, children, out_caps, side, iterations, per_sample;
};

EMArgs em_args(const at::Tensor& poses, const at::Tensor& activations, const at::Tensor& weight,
               const at::Tensor& offsets, const at::Tensor& beta_u, const at::Tensor& beta_a,
               c10::ArrayRef<double> lambdas, int64_t per_sample, const at::Tensor& child_index, int64_t child_count) {
  TORCH_CHECK(poses.dim() == 4 && poses.size(2) == poses.size(3),
              "em_cpu: poses must be (windows, children, P, P), got ", poses.sizes());
  const int64_t N = poses.size(0), C = poses.size(1), P = poses.size(2);
  TORCH_CHECK(P >= 1 && P <= kLargestSide, "em_cpu: the C++ kernels take poses of side 1 to ", kLargestSide,
              ", got ", P, "; use backend='torch' for larger poses");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == P && weight.size(3) == P,
              "em_cpu: weight must be (out_caps, ", C, ", ", P, ", ", P, "), got ", weight.sizes());
  const int64_t J = weight.size(0);
  TORCH_CHECK(activations.dim() == 2 && activations.size(0) == N && activations.size(1) == C,
              "em_cpu: activations must be (", N, ", ", C, "), got ", activations.sizes());
  TORCH_CHECK(offsets.numel() == 0 || (offsets.dim() == 3 && offsets.size(0) == C && offsets.size(1) == P &&
                                       offsets.size(2) == P),
              "em_cpu: offsets must be empty or (", C, ", ", P, ", ", P, "), got ", offsets.sizes());
  TORCH_CHECK(beta_u.numel() == J && beta_a.numel() == J, "em_cpu: beta_u and beta_a must have ", J, " values");
  TORCH_CHECK(!lambdas.empty(), "em_cpu: lambdas must hold one inverse temperature per iteration, got none");
  TORCH_CHECK(per_sample >= 1 && N % per_sample == 0, "em_cpu: per_sample must divide the ", N,
              " windows, got ", per_sample);
  if (child_index.numel() != 0) {
    TORCH_CHECK(child_index.scalar_type() == at::kLong && child_index.dim() == 2 && child_index.size(0) == per_sample &&
                    child_index.size(1) == C && child_index.is_contiguous(),
                "em_cpu: child_index must be empty or a contiguous int64 (", per_sample, ", ", C, ") tensor, got ",
                child_index.sizes());
    const int64_t* index = child_index.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < child_index.numel(); ++k)
      TORCH_CHECK(index[k] >= 0 && index[k] < child_count, "em_cpu: child_index must lie in [0, ", child_count,
                  "), got ", index[k]);
  }
  for (const at::Tensor* t : {&poses, &activations, &weight, &offsets, &beta_u, &beta_a})
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == poses.scalar_type() && t->is_contiguous()),
                "em_cpu: every tensor must be contiguous and of poses' dtype");
  return EMArgs{N, C, J, P, static_cast<int64_t>(lambdas.size()), per_sample};
}

template <typename T>
EMOptions<T> em_options(c10::ArrayRef<double> lambdas, double eps, double variance_floor, bool detach_routing) {
  EMOptions<T> options{std::vector<T>(lambdas.begin(), lambdas.end()), T(eps), T(variance_floor), detach_routing};
  return options;
}

// run(call) with the call's kernels compiled for its pose side P (1 .. kLargestSide).
template <typename T, typename Run, std::size_t... sides>
void with_call(const EMArgs& args, const EMOptions<T>& options, const at::Tensor& poses, const at::Tensor& activations,
               const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& beta_u,
               const at::Tensor& beta_a, const at::Tensor& child_index, int64_t child_count, const Run& run,
               std::index_sequence<sides...>) {
  const EMShape shape{args.windows, args.per_sample, args.children, args.out_caps, args.iterations};
  auto make = [&](auto side_constant) {
    constexpr int64_t P = decltype(side_constant)::value;
    if (args.side != P) return;
    EMWindow<T, P> window{shape, options, weight.const_data_ptr<T>(),
                          offsets.numel() ? offsets.const_data_ptr<T>() : nullptr, beta_u.const_data_ptr<T>(),
                          beta_a.const_data_ptr<T>()};
    run(EMCall<T, P>{window, poses.const_data_ptr<T>(), activations.const_data_ptr<T>(),
                     child_index.numel() ? child_index.const_data_ptr<int64_t>() : nullptr, child_count});
  };
  (make(std::integral_constant<int64_t, int64_t(sides) + 1>{}), ...);
}

template <typename T, typename Run>
void with_call(const EMArgs& args, const EMOptions<T>& options, const at::Tensor& poses, const at::Tensor& activations,
               const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& beta_u,
               const at::Tensor& beta_a, const at::Tensor& child_index, int64_t child_count, const Run& run) {
  with_call(args, options, poses, activations, weight, offsets, beta_u, beta_a, child_index, child_count, run,
            std::make_index_sequence<kLargestSide>{});
}

FASTCAPS_KERNELS_END

namespace fastcaps {
namespace FASTCAPS_ISA {

std::tuple<at::Tensor, at::Tensor, at::Tensor> em_cpu_forward(
    const at::Tensor& poses, const at::Tensor& activations, const at::Tensor& weight, const at::Tensor& offsets,
    const at::Tensor& beta_u, const at::Tensor& beta_a, c10::ArrayRef<double> lambdas, int64_t per_sample,
    const at::Tensor& child_index, int64_t child_count, double eps, double variance_floor) {
  const EMArgs args =
      em_args(poses, activations, weight, offsets, beta_u, beta_a, lambdas, per_sample, child_index, child_count);
  const int64_t H = args.side * args.side;
  at::Tensor mu = at::empty({args.windows, args.out_caps, args.side, args.side}, poses.options());
  at::Tensor log_a = at::empty({args.windows, args.out_caps}, poses.options());
  at::Tensor state = at::empty({args.windows, args.iterations - 1, args.out_caps, 2 * H + 1}, poses.options());
  AT_DISPATCH_FLOATING_TYPES(poses.scalar_type(), "em_cpu_forward", [&] {
    const EMOptions<scalar_t> options = em_options<scalar_t>(lambdas, eps, variance_floor, false);
    with_call<scalar_t>(args, options, poses, activations, weight, offsets, beta_u, beta_a, child_index, child_count,
                        [&](const auto& call) {
                          em_forward_kernel(call, mu.mutable_data_ptr<scalar_t>(), log_a.mutable_data_ptr<scalar_t>(),
                                            state.mutable_data_ptr<scalar_t>());
                        });
  });
  return {mu, log_a, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_cpu_backward(
    const at::Tensor& grad_mu, const at::Tensor& grad_a, const at::Tensor& poses, const at::Tensor& activations,
    const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& beta_u, const at::Tensor& beta_a,
    const at::Tensor& state, c10::ArrayRef<double> lambdas, int64_t per_sample, const at::Tensor& child_index,
    int64_t child_count, bool detach_routing, double eps, double variance_floor) {
  const EMArgs args =
      em_args(poses, activations, weight, offsets, beta_u, beta_a, lambdas, per_sample, child_index, child_count);
  const int64_t H = args.side * args.side;
  TORCH_CHECK(grad_mu.numel() == args.windows * args.out_caps * H && grad_a.numel() == args.windows * args.out_caps &&
                  grad_mu.is_contiguous() && grad_a.is_contiguous() && grad_mu.scalar_type() == poses.scalar_type() &&
                  grad_a.scalar_type() == poses.scalar_type(),
              "em_cpu: grad_mu and grad_a must be contiguous (windows, out_caps, P, P) and (windows, out_caps) "
              "tensors of poses' dtype");
  TORCH_CHECK(state.numel() == args.windows * (args.iterations - 1) * args.out_caps * (2 * H + 1) &&
                  state.is_contiguous() && state.scalar_type() == poses.scalar_type(),
              "em_cpu: state must be the forward's (windows, iterations - 1, out_caps, 2 P^2 + 1) tensor");
  at::Tensor grad_poses = at::empty_like(poses);
  at::Tensor grad_acts = at::empty_like(activations);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_beta_u = at::empty_like(beta_u);
  at::Tensor grad_beta_a = at::empty_like(beta_a);
  AT_DISPATCH_FLOATING_TYPES(poses.scalar_type(), "em_cpu_backward", [&] {
    const EMOptions<scalar_t> options = em_options<scalar_t>(lambdas, eps, variance_floor, detach_routing);
    with_call<scalar_t>(args, options, poses, activations, weight, offsets, beta_u, beta_a, child_index, child_count,
                        [&](const auto& call) {
                          em_backward_kernel(call, grad_mu.const_data_ptr<scalar_t>(),
                                             grad_a.const_data_ptr<scalar_t>(), state.const_data_ptr<scalar_t>(),
                                             grad_poses.mutable_data_ptr<scalar_t>(),
                                             grad_acts.mutable_data_ptr<scalar_t>(),
                                             grad_weight.mutable_data_ptr<scalar_t>(),
                                             grad_beta_u.mutable_data_ptr<scalar_t>(),
                                             grad_beta_a.mutable_data_ptr<scalar_t>());
                        });
  });
  return {grad_poses, grad_acts, grad_weight, grad_beta_u, grad_beta_a};
}

}  // namespace FASTCAPS_ISA
}  // namespace fastcaps
