// Fused CPU routing kernels: DESIGN.md sections 2-3 without materializing u_hat for the batch.
//
// Schemas are defined in Python (fastcaps/_routing_cpu.py); this file implements them for
// the CPU dispatch key. Layouts (all contiguous):
//   u        (B, I, Din)
//   weight_t (I, Din, J*D)   weight permuted so that, for one input capsule i, u_hat[i] is
//                            Din contiguous multiply-adds over J*D values
//   bias     (J*D) or an empty tensor
//   s        (B, r, J*D)     each iteration's pre-squash sum, saved for the backward
//
// Forward: parallel over samples; a thread keeps one sample's u_hat (I x J*D) in a local
// buffer and makes r passes over it with only V (J*D) and s as routing state.
// Backward: phase A, parallel over samples, computes sigma_t = dL/ds_t for every t (the
// r - 1 reduction passes); phase B, parallel over blocks of input capsules, walks the
// batch in order for each capsule, so grad W is summed over the batch in a fixed order:
// results are bitwise identical for any thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fastcaps {
namespace {

struct Dims {
  int64_t batch, in_caps, in_dim, out_caps, out_dim, iterations;
  int64_t jd() const { return out_caps * out_dim; }
};

// a = |s| / (1 + |s|^2) written as 1 / (n + 1/n): 0 at n = 0 and at n = inf, never NaN.
template <typename T>
inline T squash_scale(T norm) {
  return norm > T(0) ? T(1) / (norm + T(1) / norm) : T(0);
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = T(0);
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// u_hat[i] (J*D) = sum_e u[i, e] * weight_t[i, e, :]
template <typename T>
inline void prediction(const T* u_i, const T* weight_i, const Dims& d, T* out) {
  const int64_t jd = d.jd();
  std::fill(out, out + jd, T(0));
  for (int64_t e = 0; e < d.in_dim; ++e) {
    const T ue = u_i[e];
    const T* w = weight_i + e * jd;
    for (int64_t k = 0; k < jd; ++k) out[k] += ue * w[k];
  }
}

// c[j] = softmax_j(u_hat[i, j] . routed[j]); uniform when routed is null (first pass).
template <typename T>
inline void couplings(const T* u_hat_i, const T* routed, const Dims& d, T* c) {
  const int64_t J = d.out_caps, D = d.out_dim;
  if (routed == nullptr) {
    std::fill(c, c + J, T(1) / T(J));
    return;
  }
  T largest = -INFINITY;
  for (int64_t j = 0; j < J; ++j) {
    c[j] = dot(u_hat_i + j * D, routed + j * D, D);
    largest = std::max(largest, c[j]);
  }
  T total = T(0);
  for (int64_t j = 0; j < J; ++j) {
    c[j] = std::exp(c[j] - largest);
    total += c[j];
  }
  const T inverse = T(1) / total;
  for (int64_t j = 0; j < J; ++j) c[j] *= inverse;
}

// sigma = J(s) g per output capsule: a g + a (1 - n^2)/(1 + n^2) s_hat (s_hat . g).
template <typename T>
inline void squash_backward(const T* s, const T* g, const Dims& d, T* sigma) {
  const int64_t D = d.out_dim;
  for (int64_t j = 0; j < d.out_caps; ++j) {
    const T* sj = s + j * D;
    const T* gj = g + j * D;
    T* out = sigma + j * D;
    const T norm = std::sqrt(dot(sj, sj, D));
    const T scale = squash_scale(norm);
    if (norm > T(0)) {
      const T radial = T(2) / (T(1) + norm * norm) - T(1);
      const T along = dot(sj, gj, D) / (norm * norm);  // (s_hat . g) / n
      for (int64_t k = 0; k < D; ++k) out[k] = scale * (gj[k] + radial * along * sj[k]);
    } else {
      for (int64_t k = 0; k < D; ++k) out[k] = scale * gj[k];
    }
  }
}

// delta[j] = dL/dlogit_j = c_j (gamma_j - sum_k c_k gamma_k), with gamma_j = sigma_j . u_hat[i, j]:
// the gradient through the coupling c_j (DESIGN.md section 3).
template <typename T>
inline void logit_gradients(const T* u_hat_i, const T* sigma, const T* c, const Dims& d, T* delta) {
  const int64_t J = d.out_caps, D = d.out_dim;
  T mean = T(0);
  for (int64_t j = 0; j < J; ++j) {
    delta[j] = dot(sigma + j * D, u_hat_i + j * D, D);
    mean += c[j] * delta[j];
  }
  for (int64_t j = 0; j < J; ++j) delta[j] = c[j] * (delta[j] - mean);
}

template <typename T>
void forward_kernel(const T* u, const T* weight_t, const T* bias, const Dims& d, T* v_out, T* s_out) {
  const int64_t I = d.in_caps, J = d.out_caps, D = d.out_dim, jd = d.jd(), r = d.iterations;
  at::parallel_for(0, d.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> u_hat(I * jd), routed(jd), c(J);
    for (int64_t b = begin; b < end; ++b) {
      const T* u_b = u + b * I * d.in_dim;
      for (int64_t i = 0; i < I; ++i)
        prediction(u_b + i * d.in_dim, weight_t + i * d.in_dim * jd, d, u_hat.data() + i * jd);
      std::fill(routed.begin(), routed.end(), T(0));
      for (int64_t t = 0; t < r; ++t) {
        T* s = s_out + (b * r + t) * jd;
        std::fill(s, s + jd, T(0));
        for (int64_t i = 0; i < I; ++i) {
          const T* row = u_hat.data() + i * jd;
          couplings(row, t == 0 ? nullptr : routed.data(), d, c.data());
          for (int64_t j = 0; j < J; ++j)
            for (int64_t k = 0; k < D; ++k) s[j * D + k] += c[j] * row[j * D + k];
        }
        if (bias != nullptr)
          for (int64_t k = 0; k < jd; ++k) s[k] += bias[k];
        T* v = v_out + b * jd;
        for (int64_t j = 0; j < J; ++j) {
          const T scale = squash_scale(std::sqrt(dot(s + j * D, s + j * D, D)));
          for (int64_t k = 0; k < D; ++k) {
            v[j * D + k] = scale * s[j * D + k];
            routed[j * D + k] += v[j * D + k];
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* grad_v, const T* u, const T* weight_t, const T* s_all, const Dims& d, bool detach,
                     T* grad_u, T* grad_weight_t, T* grad_bias) {
  const int64_t B = d.batch, I = d.in_caps, Din = d.in_dim, J = d.out_caps, D = d.out_dim, jd = d.jd(),
                r = d.iterations;
  const int64_t first = detach ? r - 1 : 0;  // with detach only the last iteration carries gradient
  // routed[b, t] = V_{t-1} (0 for t = 0) and sigma[b, t] = dL/ds_t; small: B x r x J*D each.
  std::vector<T> routed(B * r * jd, T(0)), sigma(B * r * jd, T(0));

  // Phase A, per sample: V_t from s, then sigma_t for t = r..1 and G = dL/dV through the logits.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> u_hat(I * jd), grad_routed(jd), grad_v_t(jd), c(J), delta(J);
    for (int64_t b = begin; b < end; ++b) {
      const T* s_b = s_all + b * r * jd;
      T* routed_b = routed.data() + b * r * jd;
      T* sigma_b = sigma.data() + b * r * jd;
      for (int64_t t = 1; t < r; ++t) {
        for (int64_t j = 0; j < J; ++j) {
          const T* s = s_b + (t - 1) * jd + j * D;
          const T scale = squash_scale(std::sqrt(dot(s, s, D)));
          for (int64_t k = 0; k < D; ++k)
            routed_b[t * jd + j * D + k] = routed_b[(t - 1) * jd + j * D + k] + scale * s[k];
        }
      }
      const bool needs_u_hat = !detach && r > 1;
      if (needs_u_hat) {
        const T* u_b = u + b * I * Din;
        for (int64_t i = 0; i < I; ++i) prediction(u_b + i * Din, weight_t + i * Din * jd, d, u_hat.data() + i * jd);
      }
      std::fill(grad_routed.begin(), grad_routed.end(), T(0));
      for (int64_t t = r - 1; t >= first; --t) {
        for (int64_t k = 0; k < jd; ++k) grad_v_t[k] = grad_routed[k] + (t == r - 1 ? grad_v[b * jd + k] : T(0));
        squash_backward(s_b + t * jd, grad_v_t.data(), d, sigma_b + t * jd);
        if (t == 0 || detach) continue;
        const T* sig = sigma_b + t * jd;
        for (int64_t i = 0; i < I; ++i) {
          const T* row = u_hat.data() + i * jd;
          couplings(row, routed_b + t * jd, d, c.data());
          logit_gradients(row, sig, c.data(), d, delta.data());
          for (int64_t j = 0; j < J; ++j)
            for (int64_t k = 0; k < D; ++k) grad_routed[j * D + k] += delta[j] * row[j * D + k];
        }
      }
    }
  });

  // grad bias: sum over samples and iterations, in a fixed order.
  std::fill(grad_bias, grad_bias + jd, T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = first; t < r; ++t)
      for (int64_t k = 0; k < jd; ++k) grad_bias[k] += sigma[(b * r + t) * jd + k];

  // Phase B, per input capsule, the batch in order: g_uhat, then grad u and grad W.
  at::parallel_for(0, I, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> row(jd), grad_row(jd), c(J), delta(J);
    for (int64_t i = begin; i < end; ++i) {
      const T* weight_i = weight_t + i * Din * jd;
      T* grad_weight_i = grad_weight_t + i * Din * jd;
      std::fill(grad_weight_i, grad_weight_i + Din * jd, T(0));
      for (int64_t b = 0; b < B; ++b) {
        const T* u_bi = u + (b * I + i) * Din;
        prediction(u_bi, weight_i, d, row.data());
        std::fill(grad_row.begin(), grad_row.end(), T(0));
        for (int64_t t = first; t < r; ++t) {
          const T* sig = sigma.data() + (b * r + t) * jd;
          const T* routed_t = routed.data() + (b * r + t) * jd;
          couplings(row.data(), t == 0 ? nullptr : routed_t, d, c.data());
          if (t > 0 && !detach) {
            logit_gradients(row.data(), sig, c.data(), d, delta.data());
          } else {
            std::fill(delta.begin(), delta.end(), T(0));  // constant couplings
          }
          for (int64_t j = 0; j < J; ++j)
            for (int64_t k = 0; k < D; ++k)
              grad_row[j * D + k] += c[j] * sig[j * D + k] + delta[j] * routed_t[j * D + k];
        }
        T* grad_u_bi = grad_u + (b * I + i) * Din;
        for (int64_t e = 0; e < Din; ++e) {
          grad_u_bi[e] = dot(weight_i + e * jd, grad_row.data(), jd);
          const T ue = u_bi[e];
          T* gw = grad_weight_i + e * jd;
          for (int64_t k = 0; k < jd; ++k) gw[k] += ue * grad_row[k];
        }
      }
    }
  });
}

Dims dims_of(const at::Tensor& u, const at::Tensor& weight_t, int64_t out_caps, int64_t iterations) {
  TORCH_CHECK(u.dim() == 3, "routing_cpu: u must be (batch, in_caps, in_dim), got ", u.sizes());
  TORCH_CHECK(weight_t.dim() == 3, "routing_cpu: weight_t must be (in_caps, in_dim, out_caps * out_dim), got ",
              weight_t.sizes());
  TORCH_CHECK(out_caps >= 1 && weight_t.size(2) % out_caps == 0, "routing_cpu: out_caps=", out_caps,
              " does not divide weight_t's last dimension ", weight_t.size(2));
  TORCH_CHECK(iterations >= 1, "routing_cpu: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(weight_t.size(0) == u.size(1) && weight_t.size(1) == u.size(2),
              "routing_cpu: weight_t of shape ", weight_t.sizes(), " does not match u of shape ", u.sizes());
  TORCH_CHECK(u.scalar_type() == weight_t.scalar_type(), "routing_cpu: u and weight_t must share a dtype");
  TORCH_INTERNAL_ASSERT(u.is_contiguous() && weight_t.is_contiguous(), "routing_cpu: the launcher passes contiguous tensors");
  return Dims{u.size(0), u.size(1), u.size(2), out_caps, weight_t.size(2) / out_caps, iterations};
}

std::tuple<at::Tensor, at::Tensor> routing_cpu_forward(const at::Tensor& u, const at::Tensor& weight_t,
                                                       const at::Tensor& bias, int64_t out_caps, int64_t iterations) {
  const Dims d = dims_of(u, weight_t, out_caps, iterations);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == d.jd() && bias.is_contiguous() && bias.scalar_type() == u.scalar_type()),
              "routing_cpu: bias must be empty or a contiguous (out_caps * out_dim) tensor of u's dtype");
  at::Tensor v = at::empty({d.batch, d.out_caps, d.out_dim}, u.options());
  at::Tensor s = at::empty({d.batch, d.iterations, d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_forward", [&] {
    forward_kernel<scalar_t>(u.const_data_ptr<scalar_t>(), weight_t.const_data_ptr<scalar_t>(),
                             bias.numel() ? bias.const_data_ptr<scalar_t>() : nullptr, d,
                             v.mutable_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>());
  });
  return {v, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                                    const at::Tensor& weight_t, const at::Tensor& s,
                                                                    int64_t out_caps, int64_t iterations, bool detach) {
  const Dims d = dims_of(u, weight_t, out_caps, iterations);
  TORCH_INTERNAL_ASSERT(grad_v.is_contiguous() && s.is_contiguous());
  TORCH_CHECK(grad_v.numel() == d.batch * d.jd() && s.numel() == d.batch * d.iterations * d.jd(),
              "routing_cpu: grad_v or s has the wrong size for u and weight_t");
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_weight_t = at::empty_like(weight_t);
  at::Tensor grad_bias = at::empty({d.out_caps, d.out_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "routing_cpu_backward", [&] {
    backward_kernel<scalar_t>(grad_v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                              weight_t.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), d, detach,
                              grad_u.mutable_data_ptr<scalar_t>(), grad_weight_t.mutable_data_ptr<scalar_t>(),
                              grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_u, grad_weight_t, grad_bias};
}

}  // namespace
}  // namespace fastcaps

TORCH_LIBRARY_IMPL(fastcaps, CPU, m) {
  m.impl("routing_cpu_forward", &fastcaps::routing_cpu_forward);
  m.impl("routing_cpu_backward", &fastcaps::routing_cpu_backward);
}
