"""Drop-in torch.nn modules: they hold parameters and call ``fastcaps.functional``.

    capsules.py   DigitCaps, PrimaryCaps, ConvCaps2d
    capsnet.py    CapsNet, CapsNetOutput, Decoder
    matrix_capsules.py   PrimaryMatCaps, ConvMatCaps2d, ClassMatCaps (EM routing)
    matrix_capsnet.py    MatrixCapsNet, MatrixCapsNetOutput (the paper's smallNORB network)
    losses.py     MarginLoss, CapsuleLoss, SpreadLoss
    weights.py    convert_weight
"""

from .capsnet import CapsNet, CapsNetOutput, Decoder
from .capsules import ConvCaps2d, DigitCaps, PrimaryCaps
from .losses import CapsuleLoss, MarginLoss, SpreadLoss
from .matrix_capsnet import MatrixCapsNet, MatrixCapsNetOutput
from .matrix_capsules import ClassMatCaps, ConvMatCaps2d, PrimaryMatCaps
from .weights import convert_weight

__all__ = ["DigitCaps", "PrimaryCaps", "ConvCaps2d", "Decoder", "CapsNet", "CapsNetOutput", "MarginLoss", "CapsuleLoss",
           "convert_weight", "PrimaryMatCaps", "ConvMatCaps2d", "ClassMatCaps", "MatrixCapsNet", "MatrixCapsNetOutput",
           "SpreadLoss"]
