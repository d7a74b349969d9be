"""Drop-in, shown: a CapsNet written the way the popular public PyTorch implementations
write it, with its DigitCaps swapped for ``fastcaps.DigitCaps`` carrying the same weights.

    python examples/drop_in.py            # prints how far apart the two models' outputs are

``PublicCapsNet`` follows their conventions: PrimaryCaps as eight separate convolutions
stacked and viewed as (B, 1152, 8); DigitCaps weight W of shape (1, 1152, 10, 16, 8);
u_hat materialized; routing logits b_ij updated in place; the decoder masked by the
longest capsule. Its routing takes the softmax over the output capsules, as the paper
does (several public copies take it over the input capsules; their numbers cannot be
matched by any faithful implementation, see the README's deviations).
"""

from __future__ import annotations

import torch
from torch import nn

import fastcaps


def public_squash(x, dim=-1):
    squared_norm = (x ** 2).sum(dim, keepdim=True)
    return squared_norm * x / ((1.0 + squared_norm) * torch.sqrt(squared_norm))


class PublicPrimaryCaps(nn.Module):
    def __init__(self, num_capsules=8, in_channels=256, out_channels=32, kernel_size=9):
        super().__init__()
        self.capsules = nn.ModuleList(
            [nn.Conv2d(in_channels, out_channels, kernel_size, stride=2) for _ in range(num_capsules)])

    def forward(self, x):
        u = torch.stack([capsule(x) for capsule in self.capsules], dim=1)  # (B, 8, 32, 6, 6)
        return public_squash(u.view(x.size(0), 32 * 6 * 6, -1))


class PublicDigitCaps(nn.Module):
    def __init__(self, num_capsules=10, num_routes=32 * 6 * 6, in_channels=8, out_channels=16, iterations=3):
        super().__init__()
        self.iterations = iterations
        self.W = nn.Parameter(0.05 * torch.randn(1, num_routes, num_capsules, out_channels, in_channels))

    def forward(self, x):
        batch = x.size(0)
        x = x.unsqueeze(2).unsqueeze(-1)                       # (B, 1152, 1, 8, 1)
        u_hat = torch.matmul(self.W, x).squeeze(-1)            # (B, 1152, 10, 16)
        b_ij = torch.zeros(batch, u_hat.size(1), u_hat.size(2), 1, device=x.device)
        for iteration in range(self.iterations):
            c_ij = torch.softmax(b_ij, dim=2)                  # over the 10 output capsules
            v_j = public_squash((c_ij * u_hat).sum(dim=1, keepdim=True))  # (B, 1, 10, 16)
            if iteration < self.iterations - 1:
                b_ij = b_ij + (u_hat * v_j).sum(-1, keepdim=True)
        return v_j.squeeze(1)                                   # (B, 10, 16)


class PublicCapsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_layer = nn.Conv2d(1, 256, 9)
        self.primary_capsules = PublicPrimaryCaps()
        self.digit_capsules = PublicDigitCaps()
        self.decoder = nn.Sequential(nn.Linear(16 * 10, 512), nn.ReLU(inplace=True), nn.Linear(512, 1024),
                                     nn.ReLU(inplace=True), nn.Linear(1024, 784), nn.Sigmoid())

    def forward(self, images):
        capsules = self.digit_capsules(self.primary_capsules(torch.relu(self.conv_layer(images))))
        lengths = capsules.norm(dim=-1)
        mask = torch.nn.functional.one_hot(lengths.argmax(dim=1), 10).unsqueeze(-1)
        reconstruction = self.decoder((capsules * mask).flatten(1)).view(-1, 1, 28, 28)
        return lengths, reconstruction


def swap_in_fastcaps(model: PublicCapsNet, backend: str = "auto") -> PublicCapsNet:
    """Replaces model.digit_capsules with fastcaps.DigitCaps holding the same W; in place."""
    theirs = model.digit_capsules
    _, in_caps, out_caps, out_dim, in_dim = theirs.W.shape
    ours = fastcaps.DigitCaps(in_caps, in_dim, out_caps, out_dim, iterations=theirs.iterations, backend=backend,
                              device=theirs.W.device, dtype=theirs.W.dtype)
    with torch.no_grad():
        ours.weight.copy_(fastcaps.convert_weight(theirs.W, "1 in_caps out_caps out_dim in_dim"))
    model.digit_capsules = ours
    return model


def compare(backend: str = "auto", batch: int = 4, seed: int = 0):
    """(max |difference| of the class lengths, of the reconstructions) between the public
    model and the same model after the swap."""
    torch.manual_seed(seed)
    model = PublicCapsNet().eval()
    images = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        lengths, reconstruction = model(images)
        swapped_lengths, swapped_reconstruction = swap_in_fastcaps(model, backend)(images)
    return (float((swapped_lengths - lengths).abs().max()),
            float((swapped_reconstruction - reconstruction).abs().max()))


if __name__ == "__main__":
    for backend in fastcaps.available_backends("cpu"):
        if backend == "triton":
            continue  # on CPU only under Triton's interpreter: minutes at this shape
        length_error, reconstruction_error = compare(backend)
        print(f"{backend:>9}: max |difference| of class lengths {length_error:.1e}, "
              f"of reconstructions {reconstruction_error:.1e}")
