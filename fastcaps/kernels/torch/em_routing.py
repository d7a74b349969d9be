"""The "torch" backend's EM-routing kernels (``fastcaps::em_routing``): the executable spec,
in vectorized PyTorch with a hand-written backward (docs/em.md, "The backward").

Forward, per chunk of whole samples: gather the children of every window (``EMLayer``),
form their votes V_ij = M_i W_ij once, run the iterations, and keep per iteration but the
last only the parents' state (mu, sigma^2, log a): J x (2 P^2 + 1) numbers per window, never
the votes, the responsibilities or the log-densities. Backward, per chunk: form the votes
again and walk the iterations backwards; the responsibilities that entered iteration t are
recomputed from the state of iteration t - 1 (an E-step), so memory holds one chunk's votes
and a few tensors of their size, whatever the number of iterations. grad W, beta_u and
beta_a are summed over chunks in chunk order; within a chunk the reductions are torch's own
(sum, einsum), whose rounding can depend on the thread count: results agree across thread
counts to rounding, not bitwise (tests/test_em_kernels.py; the fused kernels must do better).

Layouts: as ``fastcaps.reference.em_routing``. A conv call (weight (J, I, Kh, Kw, P, P))
routes each output position from its window; a class call (weight (J, I, P, P), poses
(B, I, P, P) or on a grid (B, I, P, P, H, W)) routes each sample from all its capsules, W
shared across positions. state: (B * windows, r - 1, J, 2 P^2 + 1), [mu | sigma^2 | log a].
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import compute_dtype
from ..em_layer import EMKernels, EMLayer, Gradients, Options, cotangent_rows, outputs, votes


class Routing:
    """The iterations on one chunk's votes, forward and backward. Votes are (n, C, J, H)
    per window, or (b, windows, C, J, H) with per-child normalisation."""

    def __init__(self, layer: EMLayer, beta_u: Tensor, beta_a: Tensor, lambdas: Sequence[float], options: Options):
        self.layer, self.beta_u, self.beta_a, self.lambdas = layer, beta_u, beta_a, list(lambdas)
        self.eps, self.floor = options.eps, options.variance_floor
        self.detach_routing = options.detach_routing

    def per_child(self) -> bool:
        return self.layer.child_index is not None

    def initial(self, v: Tensor) -> Tensor:
        """R entering the first M-step: 1/J, or 1/(J w_i) per child."""
        out_caps = v.shape[-2]
        if not self.per_child():
            return v.new_full(v.shape[:-1], 1.0 / out_caps)
        index = self.layer.child_index.to(v.device)
        counts = v.new_zeros(self.layer.child_count + 1).index_add_(0, index.flatten(),
                                                                     v.new_ones(index.numel()))
        return (1.0 / (counts[index].clamp_min(1) * out_caps))[..., None].expand(v.shape[:-1])

    def group_sum(self, per_slot: Tensor) -> Tensor:
        """(b, windows, C) -> each slot's sum over the slots of the same input capsule."""
        index = self.layer.child_index.to(per_slot.device).flatten().expand(per_slot.shape[0], -1)
        flat = per_slot.reshape(per_slot.shape[0], -1)
        totals = flat.new_zeros(flat.shape[0], self.layer.child_count + 1).scatter_add_(1, index, flat)
        return totals.gather(1, index).view(per_slot.shape)

    def log_normaliser(self, logits: Tensor) -> Tensor:
        """The E-step's log denominator per slot (..., C, 1)."""
        per_slot = torch.logsumexp(logits, dim=-1)
        if self.per_child():
            # A logsumexp per input capsule over its slots, shifted by the capsule's largest slot.
            index = self.layer.child_index.to(logits.device).flatten().expand(logits.shape[0], -1)
            flat = per_slot.reshape(logits.shape[0], -1)
            shift = flat.new_full((flat.shape[0], self.layer.child_count + 1), -math.inf).scatter_reduce_(
                1, index, flat, "amax").gather(1, index).view(per_slot.shape)
            per_slot = shift + torch.log(self.group_sum(torch.exp(per_slot - shift)))
        return per_slot[..., None]

    def m_step(self, responsibility, v, a_in, lam):
        """The forward of one M-step, with what its backward needs."""
        r = responsibility * a_in[..., None]
        r_sum = r.sum(-2)
        denominator = r_sum.clamp_min(self.eps)
        w = r / denominator[..., None, :]
        mu = (w[..., None] * v).sum(-3)
        diff = v - mu[..., None, :, :]
        variance = (w[..., None] * diff * diff).sum(-3) + self.floor
        log_variance = torch.log(variance)
        z = lam * (self.beta_a - ((self.beta_u[:, None] + 0.5 * log_variance) * r_sum[..., None]).sum(-1))
        return dict(r=r, r_sum=r_sum, denominator=denominator, w=w, mu=mu, diff=diff, variance=variance,
                    log_variance=log_variance, z=z, log_a=F.logsigmoid(z))

    def e_step(self, v, mu, variance, log_a):
        """R (..., C, J) from the parents' state."""
        diff = v - mu[..., None, :, :]
        log_p = -0.5 * (diff * diff / variance[..., None, :, :] + torch.log(2 * math.pi * variance)[..., None, :, :]
                        ).sum(-1)
        logits = log_a[..., None, :] + log_p
        return torch.exp(logits - self.log_normaliser(logits))

    def forward(self, v: Tensor, a_in: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """(mu, log a) of the last iteration, and (mu | sigma^2 | log a) of every other one."""
        responsibility = self.initial(v)
        states = []
        for t, lam in enumerate(self.lambdas):
            step = self.m_step(responsibility, v, a_in, lam)
            if t == len(self.lambdas) - 1:
                return step["mu"], step["log_a"], states
            states.append(torch.cat([step["mu"], step["variance"], step["log_a"][..., None]], dim=-1))
            responsibility = self.e_step(v, step["mu"], step["variance"], step["log_a"])

    def m_step_backward(self, step, responsibility, v, a_in, lam, grad_mu, grad_variance, grad_log_a):
        """Gradients of (R, V, a_in, beta_u, beta_a) from those of (mu, sigma^2, log a)."""
        r_sum, denominator, w, diff = step["r_sum"], step["denominator"], step["w"], step["diff"]
        grad_z = grad_log_a * torch.sigmoid(-step["z"])
        grad_beta_a = lam * grad_z.reshape(-1, grad_z.shape[-1]).sum(0)
        grad_cost = -lam * grad_z                                         # d/d cost_j^h, the same for every h
        grad_beta_u = (grad_cost * r_sum * v.shape[-1]).reshape(-1, grad_z.shape[-1]).sum(0)
        grad_variance = grad_variance + (grad_cost * r_sum)[..., None] * 0.5 / step["variance"]
        grad_r_sum = grad_cost * (self.beta_u[:, None] + 0.5 * step["log_variance"]).sum(-1)
        # variance = sum_c w diff^2 + floor, mu = sum_c w V.
        grad_w = (grad_variance[..., None, :, :] * diff * diff).sum(-1)
        grad_v = 2 * grad_variance[..., None, :, :] * w[..., None] * diff
        grad_mu = grad_mu - 2 * grad_variance * (w[..., None] * diff).sum(-3)
        grad_w = grad_w + (grad_mu[..., None, :, :] * v).sum(-1)
        grad_v = grad_v + grad_mu[..., None, :, :] * w[..., None]
        # w = r / max(sum_c r, eps) (clamp_min passes the gradient where sum_c r >= eps).
        grad_r = grad_w / denominator[..., None, :]
        grad_denominator = -(grad_w * step["r"]).sum(-2) / (denominator * denominator)
        grad_r_sum = grad_r_sum + grad_denominator * (r_sum >= self.eps)
        grad_r = grad_r + grad_r_sum[..., None, :]
        return grad_r * a_in[..., None], grad_v, (grad_r * responsibility).sum(-1), grad_beta_u, grad_beta_a

    def e_step_backward(self, responsibility, v, mu, variance, grad_responsibility):
        """Gradients of (mu, sigma^2, log a, V) from that of R = E-step(V; mu, sigma^2, log a)."""
        grad_log_r = grad_responsibility * responsibility
        total = grad_log_r.sum(-1)
        total = self.group_sum(total) if self.per_child() else total
        grad_logits = grad_log_r - responsibility * total[..., None]
        inverse = 1 / variance[..., None, :, :]
        diff = v - mu[..., None, :, :]
        weighted = grad_logits[..., None] * diff * inverse
        grad_mu = weighted.sum(-3)
        grad_variance = 0.5 * (grad_logits[..., None] * (diff * diff * inverse * inverse - inverse)).sum(-3)
        return grad_mu, grad_variance, grad_logits.sum(-2), -weighted

    def backward(self, v, a_in, states, grad_mu, grad_a):
        """(grad V, grad a_in, grad beta_u, grad beta_a) for cotangents of the last (mu, a)."""
        last = len(self.lambdas) - 1
        grad_v, grad_a_in = torch.zeros_like(v), torch.zeros_like(a_in)
        grad_beta_u, grad_beta_a = torch.zeros_like(self.beta_u), torch.zeros_like(self.beta_a)
        grad_variance = torch.zeros_like(grad_mu)
        grad_log_a = None
        for t in range(last, -1, -1):
            if t == 0:
                responsibility = self.initial(v)
            else:
                previous = states[t - 1]
                mu_p, var_p, log_a_p = previous.split([v.shape[-1], v.shape[-1], 1], dim=-1)
                responsibility = self.e_step(v, mu_p, var_p, log_a_p[..., 0])
            step = self.m_step(responsibility, v, a_in, self.lambdas[t])
            if grad_log_a is None:
                grad_log_a = grad_a * step["log_a"].exp()
            grad_r, g_v, g_a, g_bu, g_ba = self.m_step_backward(step, responsibility, v, a_in, self.lambdas[t],
                                                                 grad_mu, grad_variance, grad_log_a)
            grad_v += g_v
            grad_a_in += g_a
            grad_beta_u += g_bu
            grad_beta_a += g_ba
            if t == 0 or self.detach_routing:
                break
            grad_mu, grad_variance, grad_log_a, g_v = self.e_step_backward(responsibility, v, mu_p, var_p, grad_r)
            grad_v += g_v
        return grad_v, grad_a_in, grad_beta_u, grad_beta_a


def _compute(tensors, dtype):
    return [t.to(dtype) for t in tensors]


def em_forward(poses, activations, weight, beta_u, beta_a, lambdas, options: Options):
    """(poses_out, activations_out, state) as the op returns them."""
    dtype = compute_dtype(poses.dtype)
    poses_c, acts_c, weight_c, beta_u_c, beta_a_c = _compute((poses, activations, weight, beta_u, beta_a), dtype)
    layer = EMLayer(poses.shape, weight.shape, options)
    routing = Routing(layer, beta_u_c, beta_a_c, lambdas, options)
    child_weight, offsets = layer.child_weight(weight_c), layer.offsets(dtype, poses.device)
    mus, log_as, states = [], [], []
    for rows in layer.chunks():
        m, a_in = layer.gather(poses_c[rows], acts_c[rows])
        v = votes(m, child_weight, offsets)
        if routing.per_child():
            v, a_in = layer.per_sample(v), layer.per_sample(a_in)
        mu, log_a, chunk_states = routing.forward(v, a_in)
        windows = mu.shape[:-2].numel()
        mus.append(mu.reshape(windows, *mu.shape[-2:]))
        log_as.append(log_a.reshape(windows, -1))
        per_window = [s.reshape(windows, layer.out_caps, -1) for s in chunk_states]
        states.append(torch.stack(per_window, dim=1) if per_window
                      else mu.new_empty(windows, 0, layer.out_caps, 2 * layer.entries + 1))
    return (*outputs(layer, mus, log_as, poses.shape[0], poses.dtype), torch.cat(states))


def em_backward(grad_poses_out, grad_acts_out, poses, activations, weight, beta_u, beta_a, state, lambdas,
                options: Options):
    """(grad poses, grad activations, grad weight, grad beta_u, grad beta_a), in the inputs' dtypes."""
    dtype = state.dtype
    poses_c, acts_c, weight_c, beta_u_c, beta_a_c = _compute((poses, activations, weight, beta_u, beta_a), dtype)
    layer = EMLayer(poses.shape, weight.shape, options)
    routing = Routing(layer, beta_u_c, beta_a_c, lambdas, options)
    child_weight, offsets = layer.child_weight(weight_c), layer.offsets(dtype, poses.device)
    grad_mu_rows, grad_a_rows = cotangent_rows(layer, grad_poses_out, grad_acts_out, dtype)
    gradients = Gradients(layer, poses_c, acts_c, child_weight, beta_u_c, beta_a_c)
    for rows in layer.chunks():
        windows = slice(rows.start * layer.windows, rows.stop * layer.windows)
        m, a_in = layer.gather(poses_c[rows], acts_c[rows])
        v = votes(m, child_weight, offsets)
        grad_mu, grad_a = grad_mu_rows[windows], grad_a_rows[windows]
        chunk_states = list(state[windows].unbind(1))
        if routing.per_child():
            v, a_in, grad_mu, grad_a = (layer.per_sample(t) for t in (v, a_in, grad_mu, grad_a))
            chunk_states = [layer.per_sample(s) for s in chunk_states]
        grad_v, grad_a_in, g_bu, g_ba = routing.backward(v, a_in, chunk_states, grad_mu, grad_a)
        grad_v = grad_v.reshape(-1, layer.children, layer.out_caps, layer.side, layer.side)
        # V = M W: grad M = grad V W^T, grad W = M^T grad V (offsets are constants).
        grad_m = torch.einsum("ncjad,jcbd->ncab", grad_v, child_weight)
        gradients.add(rows, grad_m, grad_a_in.reshape(-1, layer.children), torch.einsum("ncab,ncjad->jcbd", m, grad_v),
                      g_bu, g_ba)
    return gradients.result(poses, activations, weight, beta_u, beta_a)


KERNELS = EMKernels(em_forward, em_backward)
