"""What each ``--model`` of ``fastcaps train`` trains: the network, its loss, its class scores,
and what changes per epoch. The loop (loop.py) knows only this interface.

    capsnet, conv   fastcaps.CapsNet (conv: with a ConvCaps2d layer) + CapsuleLoss (margin +
                    reconstruction); scores: the digit capsules' lengths
    em              fastcaps.MatrixCapsNet (EM routing) + SpreadLoss, whose margin grows from
                    0.2 to 0.9 over the first --margin-epochs epochs (stepped once per epoch);
                    scores: the class capsules' activations
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...nn import CapsNet, CapsuleLoss, MatrixCapsNet, SpreadLoss
from .config import MODELS, TrainConfig

__all__ = ["Task", "task_for"]


class Task:
    """The paper's CapsNet (``--model capsnet``, ``conv``)."""

    reconstructs = True

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def build(self, device: torch.device, in_channels: int, num_classes: int) -> nn.Module:
        config = self.config
        if (in_channels, num_classes) != (1, 10):
            raise ValueError(f"fastcaps train: --model {config.model} trains on 10 classes of 1-channel digits")
        return CapsNet(image_size=config.image_size, conv_channels=config.conv_channels,
                       primary_channels=config.primary_channels, iterations=config.iterations,
                       backend=config.backend, device=device, conv_caps=MODELS[config.model])

    def make_loss(self) -> nn.Module:
        return CapsuleLoss()

    def forward(self, runner: nn.Module, images: Tensor, labels: Optional[Tensor]):
        return runner(images, labels)

    def loss(self, loss_fn: nn.Module, output, images: Tensor, labels: Tensor) -> Tensor:
        return loss_fn(output, images, labels)

    def scores(self, output) -> Tensor:
        return output.lengths

    def backend(self, model: nn.Module) -> str:
        return model.digits.backend

    def epoch_done(self, loss_fn: nn.Module) -> None:
        """After each epoch's evaluation."""


class MatrixCapsNetTask(Task):
    """``--model em``: MatrixCapsNet with A, B, C, D = ``em_sizes``, trained with the spread loss."""

    reconstructs = False

    def build(self, device: torch.device, in_channels: int, num_classes: int) -> nn.Module:
        config = self.config
        a, b, c, d = config.em_sizes
        return MatrixCapsNet(in_channels=in_channels, num_classes=num_classes, A=a, B=b, C=c, D=d, iterations=config.iterations,
                             inverse_temperature=config.inverse_temperature, backend=config.backend, device=device)

    def make_loss(self) -> nn.Module:
        return SpreadLoss(0.2, 0.9, steps=self.config.margin_epochs)

    def forward(self, runner: nn.Module, images: Tensor, labels: Optional[Tensor]):
        return runner(images)

    def loss(self, loss_fn: nn.Module, output, images: Tensor, labels: Tensor) -> Tensor:
        return loss_fn(output.activations, labels)

    def scores(self, output) -> Tensor:
        return output.activations

    def backend(self, model: nn.Module) -> str:
        return model.class_caps.backend

    def epoch_done(self, loss_fn: nn.Module) -> None:
        loss_fn.step()


def task_for(config: TrainConfig) -> Task:
    return MatrixCapsNetTask(config) if config.model == "em" else Task(config)
