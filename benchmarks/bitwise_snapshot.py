"""Outputs and gradients of every backend at a dozen shapes and options, saved to a file, so
that a refactor can be shown to change no bit: run it before and after, then compare.

    python benchmarks/bitwise_snapshot.py save before.pt     # on the old code
    python benchmarks/bitwise_snapshot.py save after.pt      # on the new code
    python benchmarks/bitwise_snapshot.py compare before.pt after.pt

It goes through the public API only (fastcaps.dynamic_routing and fastcaps.route_votes with
positional arguments,
fastcaps.CapsNet), so the same file runs on both sides of a move. Inputs come from a
generator seeded per case, in float64, cast to the case's dtype. The Triton kernels run
under the interpreter on CPU (TRITON_INTERPRET=1 is set here), at the small cases only.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastcaps  # noqa: E402

# (batch, in_caps, in_dim, out_caps, out_dim, iterations, detach, bias, dtype)
CASES = [
    (1, 1152, 8, 10, 16, 3, False, False, torch.float32),  # MNIST, B = 1: W read by rows
    (3, 37, 5, 4, 6, 3, False, True, torch.float64),
    (17, 301, 8, 7, 11, 3, True, True, torch.float32),
    (1, 301, 4, 3, 17, 2, False, False, torch.float64),
    (3, 7, 3, 3, 5, 1, False, True, torch.float32),
    (17, 33, 8, 10, 16, 3, True, False, torch.float64),
    (5, 300, 8, 10, 16, 3, False, False, torch.float32),  # capsule chunks across threads
    (13, 301, 8, 7, 11, 3, False, True, torch.float32),  # one sample per thread
    (4, 37, 4, 4, 6, 3, False, False, torch.float32),  # kept u_hat (B <= 4)
    (1, 64, 1, 1, 1, 3, False, True, torch.float64),
    (3, 1152, 8, 10, 16, 3, True, False, torch.float32),
    (17, 9, 16, 10, 16, 2, False, True, torch.float32),
    (3, 40, 4, 5, 8, 3, False, True, torch.float16),
    (3, 40, 4, 5, 8, 3, True, True, torch.bfloat16),
]
# route_votes: (leading, in_caps, out_caps, out_dim, iterations, detach, bias, leaky, dtype)
VOTES_CASES = [
    ((8, 49), 288, 4, 16, 3, False, False, False, torch.float32),  # many rows: rows in parallel
    ((3,), 37, 5, 6, 3, False, True, True, torch.float64),  # few rows: chunks across threads
    ((2, 3), 301, 7, 11, 2, True, True, False, torch.float32),
    ((17,), 9, 10, 16, 1, False, False, True, torch.float32),
    ((5, 4), 33, 3, 5, 3, False, True, False, torch.float64),
    ((4,), 40, 5, 8, 3, False, True, True, torch.float16),
]
# The interpreter is slow: Triton takes the cases with little work.
TRITON_WORK = 20_000


def _inputs(case, seed):
    batch, in_caps, in_dim, out_caps, out_dim, _, _, bias, dtype = case
    generator = torch.Generator().manual_seed(seed)
    u = fastcaps.squash(torch.randn(batch, in_caps, in_dim, generator=generator, dtype=torch.float64) * 2)
    weight = torch.randn(out_caps, in_caps, out_dim, in_dim, generator=generator, dtype=torch.float64) * 0.3
    b = torch.randn(out_caps, out_dim, generator=generator, dtype=torch.float64) * 0.3 if bias else None
    grad_v = torch.randn(batch, out_caps, out_dim, generator=generator, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (u, weight, b, grad_v)]


def _routing(backend, case, seed):
    u, weight, bias, grad_v = _inputs(case, seed)
    leaves = [t.requires_grad_() for t in (u, weight, bias) if t is not None]
    v = fastcaps.dynamic_routing(u, weight, bias, case[5], case[6], backend)
    return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]


def _route_votes(backend, case, seed):
    leading, in_caps, out_caps, out_dim, iterations, detach, bias, leaky, dtype = case
    generator = torch.Generator().manual_seed(seed)
    votes = torch.randn(*leading, in_caps, out_caps, out_dim, generator=generator, dtype=torch.float64) / 4
    b = torch.randn(out_caps, out_dim, generator=generator, dtype=torch.float64) * 0.3 if bias else None
    grad_v = torch.randn(*leading, out_caps, out_dim, generator=generator, dtype=torch.float64)
    votes, b, grad_v = [None if t is None else t.to(dtype) for t in (votes, b, grad_v)]
    leaves = [t.requires_grad_() for t in (votes, b) if t is not None]
    v = fastcaps.route_votes(votes, b, iterations, detach, leaky, backend)
    return [v.detach(), *torch.autograd.grad(v, leaves, grad_v)]


def _capsnet(backend):
    torch.manual_seed(0)
    model = fastcaps.CapsNet(image_size=20, num_classes=5, conv_channels=16, primary_channels=4,
                             routing_bias=True, backend=backend)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.rand(3, 1, 20, 20, generator=generator), torch.tensor([0, 4, 2])
    output = model(images, labels)
    fastcaps.CapsuleLoss()(output, images, labels).backward()
    return [output.lengths.detach(), output.reconstruction.detach(), *(p.grad for p in model.parameters())]


def snapshot():
    results = {}
    for backend in fastcaps.available_backends("cpu"):
        for index, case in enumerate(CASES):
            work = case[0] * case[1] * case[3] * case[4]
            if backend == "triton" and work > TRITON_WORK:
                continue
            results[(backend, index)] = _routing(backend, case, seed=index)
        for index, case in enumerate(VOTES_CASES):
            work = torch.Size(case[0]).numel() * case[1] * case[2] * case[3]
            if backend == "triton" and work > TRITON_WORK:
                continue
            results[(backend, "votes", index)] = _route_votes(backend, case, seed=100 + index)
        if backend != "triton":
            results[(backend, "capsnet")] = _capsnet(backend)
    return results


def compare(before_path, after_path) -> int:
    before, after = torch.load(before_path), torch.load(after_path)
    differing = []
    for key in sorted(set(before) | set(after), key=str):
        if key not in before or key not in after:
            differing.append(f"{key}: only in {'after' if key in after else 'before'}")
            continue
        for position, (a, b) in enumerate(zip(before[key], after[key])):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                differing.append(f"{key} tensor {position}: max difference "
                                 f"{(a.double() - b.double()).abs().max().item():.3g}")
    compared = len(set(before) & set(after))
    print(f"{compared} keys compared ({sum(len(v) for v in before.values())} tensors before); "
          f"{len(differing)} differ")
    for line in differing:
        print("  " + line)
    return 1 if differing else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        torch.save(snapshot(), sys.argv[2])
        print(f"wrote {sys.argv[2]}")
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
