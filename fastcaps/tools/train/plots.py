"""The pictures ``fastcaps train`` writes: reconstructions of test digits, and the curves."""

from __future__ import annotations

from typing import Dict, List

import torch

from ...nn import CapsNet
from ..plotting import pyplot
from .data import Digits

__all__ = ["save_reconstructions", "save_curves"]


def save_reconstructions(model: CapsNet, data: Digits, path: str, device: torch.device, columns: int = 10) -> None:
    """Test digits (the first of each class) above the decoder's reconstruction of them from
    the longest DigitCaps capsule, with the label and the prediction."""
    plt = pyplot()

    if model.decoder is None or len(data.labels) == 0:
        return
    firsts = [int((data.labels == label).nonzero()[0]) for label in data.labels.unique()[:columns]]
    images = data.images[firsts].to(device)
    model.eval()
    with torch.no_grad():
        output = model(images)
    predicted = output.lengths.argmax(1).tolist()
    figure, axes = plt.subplots(2, len(firsts), figsize=(1.2 * len(firsts), 2.8), squeeze=False)
    for column, index in enumerate(firsts):
        for row, picture in enumerate((images[column], output.reconstruction[column])):
            axis = axes[row][column]
            axis.imshow(picture[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0][column].set_title(f"label {int(data.labels[index])}", fontsize=8)
        axes[1][column].set_title(f"pred {predicted[column]}", fontsize=8)
    axes[0][0].set_ylabel("input")
    axes[1][0].set_ylabel("reconstruction")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_curves(history: List[Dict], path: str) -> None:
    plt = pyplot()

    if not history:
        return
    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "test"):
        loss_axis.plot(epochs, [entry[f"{split}_loss"] for entry in history], marker=".", label=split)
        accuracy_axis.plot(epochs, [100 * entry[f"{split}_accuracy"] for entry in history], marker=".", label=split)
    accuracy_axis.axhline(98, color="grey", linestyle=":", linewidth=1, label="98%")
    loss_axis.set(xlabel="epoch", ylabel="CapsuleLoss (margin + 0.0005 recon.)", yscale="log", title="loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy",
                      ylim=(max(0, min(100 * e["test_accuracy"] for e in history) - 5), 100.5))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
