"""Drop-in torch.nn modules: they hold parameters and call ``fastcaps.functional``.

    capsules.py   DigitCaps, PrimaryCaps, ConvCaps2d
    capsnet.py    CapsNet, CapsNetOutput, Decoder
    losses.py     MarginLoss, CapsuleLoss
    weights.py    convert_weight
"""

from .capsnet import CapsNet, CapsNetOutput, Decoder
from .capsules import ConvCaps2d, DigitCaps, PrimaryCaps
from .losses import CapsuleLoss, MarginLoss
from .weights import convert_weight

__all__ = ["DigitCaps", "PrimaryCaps", "ConvCaps2d", "Decoder", "CapsNet", "CapsNetOutput", "MarginLoss", "CapsuleLoss",
           "convert_weight"]
