// The entry points of one instruction-set build of the C++ dynamic-routing kernels: the
// CPU implementations of fastcaps::routing_cpu_forward and routing_cpu_backward, in
// fastcaps::FASTCAPS_ISA. Included once, by that build's translation unit (isa_*.cpp);
// routing.cpp picks a build at run time and registers it (isa.h declares them all).

#pragma once

#include "backward.h"
#include "forward.h"
#include "layout.h"
#include "tuning.h"
#include "votes.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

FASTCAPS_KERNELS_BEGIN

Dims dims_of(const at::Tensor& u, const at::Tensor& weight, int64_t iterations, bool leaky) {
  TORCH_CHECK(u.dim() == 3, "routing_cpu: u must be (batch, in_caps, in_dim), got ", u.sizes());
  TORCH_CHECK(weight.dim() == 4, "routing_cpu: weight must be (out_caps, in_caps, out_dim, in_dim), got ",
              weight.sizes());
  TORCH_CHECK(iterations >= 1, "routing_cpu: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(weight.size(1) == u.size(1) && weight.size(3) == u.size(2), "routing_cpu: weight of shape ",
              weight.sizes(), " does not match u of shape ", u.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type(), "routing_cpu: u and weight must share a dtype");
  TORCH_INTERNAL_ASSERT(u.is_contiguous() && weight.is_contiguous(), "routing_cpu: the launcher passes contiguous tensors");
  return Dims{u.size(0), u.size(1), u.size(2), weight.size(0), weight.size(2), iterations, leaky};
}

// The forward's u_hat kept for the backward in `kept_u_hat` (B x blocks x jd vectors), or
// null when the launcher passed an empty tensor (it asks _routing_cpu_kept_layout when to keep).
template <typename T>
Vec<T>* kept_u_hat_vectors(const at::Tensor& kept_u_hat, const Dims& d) {
  if (kept_u_hat.numel() == 0) return nullptr;
  TORCH_CHECK(kept_u_hat.numel() == d.batch * d.blocks<T>() * d.jd() * kLanes<T> && kept_u_hat.is_contiguous() &&
                  kept_u_hat.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "routing_cpu: kept_u_hat must be empty or hold batch * ceil(in_caps / ", kLanes<T>, ") * ", kLanes<T>,
              " * out_caps * out_dim contiguous values of u's dtype, got ", kept_u_hat.numel());
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(kept_u_hat.data_ptr()) % 64 == 0,
              "routing_cpu: kept_u_hat must be 64-byte aligned");
  return static_cast<Vec<T>*>(kept_u_hat.data_ptr());
}

// Checks every forward makes of the bias and every backward of its grad v and saved s
// (`where` names the op in the message, `owner` whose dtype the bias must share, `input` what
// grad v and s must fit).
void check_bias(const at::Tensor& bias, const Dims& d, c10::ScalarType dtype, const char* where, const char* owner) {
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == d.jd() && bias.is_contiguous() && bias.scalar_type() == dtype),
              where, ": bias must be empty or a contiguous (out_caps, out_dim) tensor of ", owner, " dtype");
}

void check_saved(const at::Tensor& grad_v, const at::Tensor& s, const Dims& d, const char* where, const char* input) {
  TORCH_INTERNAL_ASSERT(grad_v.is_contiguous() && s.is_contiguous());
  TORCH_CHECK(grad_v.numel() == d.batch * d.jd() && s.numel() == d.batch * d.iterations * d.jd(), where,
              ": grad_v or s has the wrong size for ", input);
}

// A votes call as the passes see it: batch N, I children, J x D parents, in_dim 1 (nothing predicts).
Dims votes_dims(const at::Tensor& votes, int64_t iterations, bool leaky) {
  TORCH_CHECK(votes.dim() == 4, "votes_cpu: votes must be (rows, in_caps, out_caps, out_dim), got ", votes.sizes());
  TORCH_CHECK(iterations >= 1, "votes_cpu: iterations must be >= 1, got ", iterations);
  TORCH_INTERNAL_ASSERT(votes.is_contiguous(), "votes_cpu: the launcher passes contiguous votes");
  return Dims{votes.size(0), votes.size(1), 1, votes.size(2), votes.size(3), iterations, leaky};
}

FASTCAPS_KERNELS_END

namespace fastcaps {
namespace FASTCAPS_ISA {

std::tuple<at::Tensor, at::Tensor> routing_cpu_forward(const at::Tensor& u, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t iterations, bool leaky,
                                                       const at::Tensor& kept_u_hat) {
  const Dims d = dims_of(u, weight, iterations, leaky);
  check_bias(bias, d, u.scalar_type(), "routing_cpu", "u's");
  at::Tensor v = at::empty({d.batch, d.out_caps, d.out_dim}, u.options());
  at::Tensor s = at::empty({d.batch, d.iterations, d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_forward", [&] {
    const Packed<scalar_t> p =
        pack(d, u.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), samples_in_parallel(d.batch));
    forward_kernel<scalar_t>(p, bias.numel() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             v.mutable_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
                             kept_u_hat_vectors<scalar_t>(kept_u_hat, d));
  });
  return {v, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                                    const at::Tensor& weight, const at::Tensor& s,
                                                                    const at::Tensor& kept_u_hat, int64_t iterations,
                                                                    bool detach_routing, bool leaky) {
  const Dims d = dims_of(u, weight, iterations, leaky);
  check_saved(grad_v, s, d, "routing_cpu", "u and weight");
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty({d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_backward", [&] {
    const Vec<scalar_t>* kept = kept_u_hat_vectors<scalar_t>(kept_u_hat, d);
    // A shared packed W pays only for phase A's passes over many samples; without it,
    // phase B packs each block into its scratch (Scratch::packed_weight). With the
    // forward's u_hat kept, phase A never reads W, and at B = 1 phase B reads it unpacked.
    const bool share_weight = kept == nullptr && !detach_routing && iterations > 1 && samples_in_parallel(d.batch);
    const Packed<scalar_t> p = pack(d, u.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), share_weight);
    backward_kernel<scalar_t>(p, grad_v.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), detach_routing, kept,
                              u.const_data_ptr<scalar_t>(), grad_u.mutable_data_ptr<scalar_t>(),
                              grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_u, grad_weight, grad_bias};
}

// votes (N, I, J, D) -> (v (N, J, D), s (N, r, J, D)).
std::tuple<at::Tensor, at::Tensor> votes_cpu_forward(const at::Tensor& votes, const at::Tensor& bias, int64_t iterations,
                                                     bool leaky) {
  const Dims d = votes_dims(votes, iterations, leaky);
  check_bias(bias, d, votes.scalar_type(), "votes_cpu", "votes'");
  at::Tensor v = at::empty({d.batch, d.out_caps, d.out_dim}, votes.options());
  at::Tensor s = at::empty({d.batch, d.iterations, d.out_caps, d.out_dim}, votes.options());
  AT_DISPATCH_FLOATING_TYPES(votes.scalar_type(), "votes_cpu_forward", [&] {
    votes_forward_kernel<scalar_t>(votes_packed<scalar_t>(d, votes.const_data_ptr<scalar_t>()),
                                   bias.numel() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                   v.mutable_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>());
  });
  return {v, s};
}

// -> (grad votes (N, I, J, D), grad bias (J, D)).
std::tuple<at::Tensor, at::Tensor> votes_cpu_backward(const at::Tensor& grad_v, const at::Tensor& votes,
                                                      const at::Tensor& s, int64_t iterations, bool detach_routing,
                                                      bool leaky) {
  const Dims d = votes_dims(votes, iterations, leaky);
  check_saved(grad_v, s, d, "votes_cpu", "votes");
  at::Tensor grad_votes = at::empty_like(votes);
  at::Tensor grad_bias = at::empty({d.out_caps, d.out_dim}, votes.options());
  AT_DISPATCH_FLOATING_TYPES(votes.scalar_type(), "votes_cpu_backward", [&] {
    votes_backward_kernel<scalar_t>(votes_packed<scalar_t>(d, votes.const_data_ptr<scalar_t>()),
                                    grad_v.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), detach_routing,
                                    grad_votes.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_votes, grad_bias};
}

// (lanes, samples): this build's kept u_hat has batch * ceil(in_caps / lanes) * lanes *
// out_caps * out_dim values of `dtype` for batches of at most `samples`, and is empty beyond.
std::tuple<int64_t, int64_t> kept_layout(c10::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "routing_cpu: the kernels compute in float32 or float64, not ", dtype);
  return {dtype == at::kFloat ? kLanes<float> : kLanes<double>, kKeepUHatSamples};
}

}  // namespace FASTCAPS_ISA
}  // namespace fastcaps
