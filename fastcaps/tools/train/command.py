"""``fastcaps train``: its command line."""

from __future__ import annotations

import argparse
import dataclasses

import torch.distributed as dist

from . import loop
from .config import MODELS, TrainConfig

__all__ = ["add_parser"]


def add_parser(commands) -> None:
    defaults = TrainConfig()
    parser = commands.add_parser("train", help="train a capsule network (CapsNet; --model em: MatrixCapsNet) on real images",
                                 description=loop.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder of MNIST's IDX files, or with --model em of smallNORB's .mat "
                                           "files (plain or .gz); default: scikit-learn's 1,797 digits, split "
                                           "80/20 with the seed")
    parser.add_argument("--model", choices=list(MODELS), default=defaults.model,
                        help="capsnet: the paper's; conv: with a ConvCaps2d layer (16 x 12D, 3x3, padding 1) "
                             "between PrimaryCaps and DigitCaps; em: MatrixCapsNet (EM routing, spread loss)")
    parser.add_argument("--epochs", type=int, help="default: 30; 40 with --model em")
    parser.add_argument("--batch-size", type=int,
                        help="the global batch, split over torchrun's processes (default: 32)")
    parser.add_argument("--lr", type=float, help="Adam's initial learning rate (default: 1e-3; 3e-3 with --model em)")
    parser.add_argument("--lr-decay", type=float,
                        help="learning rate x lr_decay every --lr-decay-steps steps, continuously (default: 0.96 "
                             "every 2000; 0.9 every 100 with --model em)")
    parser.add_argument("--lr-decay-steps", type=int)
    parser.add_argument("--max-shift", type=int, default=defaults.max_shift,
                        help="random shifts of up to this many pixels (0: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--backend", default=defaults.backend, help="routing backend of the capsule layers")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph=True)")
    parser.add_argument("--out", default=defaults.out, help="folder for the checkpoint, history and pictures")
    parser.add_argument("--resume", help="checkpoint.pt to continue from")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--conv-channels", type=int, default=defaults.conv_channels)
    parser.add_argument("--primary-channels", type=int, default=defaults.primary_channels)
    parser.add_argument("--iterations", type=int, help="routing iterations (default: 3; 2 with --model em)")
    parser.add_argument("--em-sizes", type=_four_ints, default=defaults.em_sizes,
                        help="--model em: MatrixCapsNet's A,B,C,D (default: %(default)s)")
    parser.add_argument("--camera", choices=("left", "right", "both"), default=defaults.camera,
                        help="smallNORB: which camera of the stereo pair, or both as two channels")
    parser.add_argument("--margin-epochs", type=int, default=defaults.margin_epochs,
                        help="--model em: epochs over which the spread loss's margin grows from 0.2 to 0.9 "
                             "(default: %(default)s)")
    parser.add_argument("--inverse-temperature", type=float, default=defaults.inverse_temperature,
                        help="--model em: lambda of every EM layer (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="use only the first N training and test samples")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=_run)


def _four_ints(text: str):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four comma-separated ints A,B,C,D, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected four comma-separated ints A,B,C,D, got {text!r}")
    return values


def _run(args: argparse.Namespace) -> int:
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{name: value for name, value in vars(args).items() if name in fields})
    try:
        loop.train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
