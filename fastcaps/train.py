"""``fastcaps train``: the paper's CapsNet (``fastcaps.CapsNet`` + ``CapsuleLoss``) trained on
real digits, with the paper's optimiser (Adam, learning rate 1e-3 decayed exponentially),
its augmentation (shifts of up to 2 pixels) and its reconstruction regulariser.

Data: scikit-learn's 1,797 scanned digits by default, or MNIST's IDX files with --data-dir
(fastcaps.data). Output, in --out: checkpoint.pt (model, optimiser, schedule, epoch and
history after every epoch), history.json, reconstructions.png and curves.png.

Determinism: the model is initialised from --seed, and each epoch's order and shifts come
from a generator seeded by (seed, epoch), not from the global RNG. So a run resumed from a
checkpoint takes the same steps as one that was not interrupted, and gives the same numbers.

Distributed: under ``torchrun --nproc_per_node N`` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA). --batch-size is the global batch: every
process takes an equal slice of each batch, so DDP's average of their gradients is the
gradient of the whole batch, and N processes take the steps one process would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .data import Digits, load_mnist_idx, load_sklearn_digits
from .nn import CapsNet, CapsuleLoss
from .report import _pyplot

__all__ = ["TrainConfig", "train", "epoch_batches", "shift_images", "process_slice", "add_parser"]

# Fields that fix the model's shape or its data; a checkpoint resumes only with the same ones.
_MODEL_FIELDS = ("data_dir", "image_size", "conv_channels", "primary_channels", "iterations", "seed", "limit")


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None  # MNIST IDX files; None: scikit-learn's digits
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.96  # the paper's code: lr * lr_decay ** (step / lr_decay_steps)
    lr_decay_steps: int = 2000
    max_shift: int = 2
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    compile: bool = False
    out: str = "train-out"
    resume: Optional[str] = None
    image_size: int = 28
    conv_channels: int = 256
    primary_channels: int = 32
    iterations: int = 3
    limit: Optional[int] = None  # first N training and test samples, for quick runs
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr_decay_steps", "image_size", "conv_channels",
                     "primary_channels", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastcaps train: {name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"fastcaps train: lr must be > 0, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"fastcaps train: lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if self.max_shift < 0:
            raise ValueError(f"fastcaps train: max_shift must be >= 0, got {self.max_shift!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"fastcaps train: limit must be >= 1, got {self.limit!r}")


# --- data order and augmentation ----------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> Tuple[List[Tensor], torch.Generator]:
    """The epoch's global batches (index tensors, full batches only) and the generator that
    then draws their shifts: both depend on (seed, epoch) alone."""
    generator = _epoch_generator(seed, epoch)
    order = torch.randperm(count, generator=generator)
    full = count // batch_size * batch_size
    return list(order[:full].split(batch_size)), generator


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Each image moved by its (dy, dx) in whole pixels, zero-filled (the paper's
    augmentation). shifts: (N, 2) integers."""
    if len(images) == 0:
        return images
    pad = int(shifts.abs().max())
    if pad == 0:
        return images
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return torch.stack([
        padded[k, :, pad - dy: pad - dy + height, pad - dx: pad - dx + width]
        for k, (dy, dx) in enumerate(shifts.tolist())
    ])


# --- distributed --------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start_processes(device: torch.device) -> Processes:
    """One process, or the group torchrun started (its environment says which)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size())


def process_slice(batch: Tensor, processes: Processes) -> Tensor:
    """This process's equal share of a global batch (its world-th part, in rank order)."""
    local = len(batch) // processes.world
    return batch[processes.rank * local: (processes.rank + 1) * local]


def _sum_over_processes(values: List[float], processes: Processes, device: torch.device) -> List[float]:
    if processes.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _device(config: TrainConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"fastcaps train: --device {config.device} asked for CUDA, which this machine lacks")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


# --- training -----------------------------------------------------------------------------


def _load(config: TrainConfig) -> Tuple[Digits, Digits]:
    if config.data_dir is not None:
        train_set, test_set = load_mnist_idx(config.data_dir)
        size = train_set.images.shape[-1]
        if size != config.image_size:
            raise ValueError(f"fastcaps train: the IDX images are {size}x{size}; pass --image-size {size}")
    else:
        train_set, test_set = load_sklearn_digits(config.image_size, seed=config.seed)
    if config.limit is not None:
        train_set = Digits(*(t[: config.limit] for t in train_set))
        test_set = Digits(*(t[: config.limit] for t in test_set))
    return train_set, test_set


def _model(config: TrainConfig, device: torch.device) -> CapsNet:
    torch.manual_seed(config.seed)
    return CapsNet(image_size=config.image_size, conv_channels=config.conv_channels,
                   primary_channels=config.primary_channels, iterations=config.iterations,
                   backend=config.backend, device=device)


def evaluate(model, data: Digits, batch_size: int, processes: Processes, device: torch.device) -> Tuple[float, float]:
    """Mean CapsuleLoss and accuracy over data; each process takes every world-th sample."""
    loss_fn = CapsuleLoss()
    mine = torch.arange(processes.rank, len(data.labels), processes.world)
    total_loss = correct = 0.0
    model.eval()
    with torch.no_grad():
        for indices in mine.split(batch_size):
            images, labels = data.images[indices].to(device), data.labels[indices].to(device)
            output = model(images)
            total_loss += loss_fn(output, images, labels).item() * len(indices)
            correct += (output.lengths.argmax(1) == labels).sum().item()
    total_loss, correct = _sum_over_processes([total_loss, correct], processes, device)
    count = max(len(data.labels), 1)
    return total_loss / count, correct / count


def _resume(config: TrainConfig, model, optimizer, schedule) -> Tuple[int, List[Dict]]:
    state = torch.load(config.resume, map_location="cpu", weights_only=True)
    saved = state["config"]
    different = [f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
                 for name in _MODEL_FIELDS if saved.get(name) != getattr(config, name)]
    if different:
        raise ValueError(f"fastcaps train: --resume {config.resume} was trained with other settings ("
                         + "; ".join(different) + ")")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["epoch"], state["history"]


def _say(processes: Processes, text: str) -> None:
    if processes.main:
        print(text, flush=True)


def train(config: TrainConfig) -> List[Dict]:
    """Runs the training that config describes and returns its history, one dict per epoch."""
    from tqdm import tqdm

    device = _device(config)
    processes = _start_processes(device)
    if config.batch_size % processes.world:
        raise ValueError(f"fastcaps train: batch_size {config.batch_size} must be a multiple of the "
                         f"{processes.world} processes")
    train_set, test_set = _load(config)
    if len(train_set.labels) < config.batch_size:
        raise ValueError(f"fastcaps train: batch_size {config.batch_size} is larger than the "
                         f"{len(train_set.labels)} training samples")
    model = _model(config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.lr_decay ** (step / config.lr_decay_steps))
    start_epoch, history = _resume(config, model, optimizer, schedule) if config.resume else (0, [])

    runner = torch.compile(model, fullgraph=True) if config.compile else model
    if processes.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = CapsuleLoss()
    local = config.batch_size // processes.world
    _say(processes, f"fastcaps train: {len(train_set.labels)} training and {len(test_set.labels)} test digits "
                    f"({'MNIST IDX in ' + config.data_dir if config.data_dir else 'scikit-learn digits'}), "
                    f"{config.image_size}x{config.image_size}; backend {model.digits.backend}, device {device}, "
                    f"{processes.world} process(es); batch {config.batch_size}, epochs {start_epoch + 1}-"
                    f"{config.epochs}")
    os.makedirs(config.out, exist_ok=True)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        batches, generator = epoch_batches(len(train_set.labels), config.batch_size, config.seed, epoch)
        runner.train()  # evaluate() left the runner (and any DDP or compile wrapper) in eval mode
        total_loss = correct = seen = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not (config.progress and processes.main))
        for indices in bar:
            shifts = torch.randint(-config.max_shift, config.max_shift + 1, (len(indices), 2), generator=generator)
            mine = process_slice(indices, processes)
            images = shift_images(train_set.images[mine], process_slice(shifts, processes)).to(device)
            labels = train_set.labels[mine].to(device)
            optimizer.zero_grad(set_to_none=True)
            output = runner(images, labels)
            loss = loss_fn(output, images, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_loss = loss.item()
            total_loss += step_loss * local
            correct += (output.lengths.detach().argmax(1) == labels).sum().item()
            seen += local
            bar.set_postfix(loss=f"{step_loss:.4f}")
        total_loss, correct, seen = _sum_over_processes([total_loss, correct, seen], processes, device)
        test_loss, test_accuracy = evaluate(runner, test_set, config.batch_size, processes, device)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                        "test_loss": test_loss, "test_accuracy": test_accuracy,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started})
        _say(processes, f"epoch {epoch + 1}/{config.epochs}: train loss {total_loss / seen:.4f} "
                        f"accuracy {correct / seen:.2%} | test loss {test_loss:.4f} accuracy {test_accuracy:.2%} "
                        f"| {history[-1]['seconds']:.1f} s")
        if processes.main:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "epoch": epoch + 1, "history": history,
                        "config": dataclasses.asdict(config)}, os.path.join(config.out, "checkpoint.pt"))
    if processes.main:
        with open(os.path.join(config.out, "history.json"), "w") as handle:
            json.dump(history, handle, indent=1)
        save_reconstructions(model, test_set, os.path.join(config.out, "reconstructions.png"), device)
        save_curves(history, os.path.join(config.out, "curves.png"))
        if history:
            seconds = sum(entry["seconds"] for entry in history)
            print(f"test accuracy {history[-1]['test_accuracy']:.2%} after {history[-1]['epoch']} epochs; "
                  f"this run's epochs took {seconds:.0f} s. Wrote {config.out}/checkpoint.pt, history.json, "
                  "reconstructions.png, curves.png", flush=True)
    return history


# --- pictures -----------------------------------------------------------------------------


def save_reconstructions(model: CapsNet, data: Digits, path: str, device: torch.device, columns: int = 10) -> None:
    """Test digits (the first of each class) above the decoder's reconstruction of them from
    the longest DigitCaps capsule, with the label and the prediction."""
    plt = _pyplot()

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
    plt = _pyplot()

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


# --- command line -------------------------------------------------------------------------


def add_parser(commands) -> None:
    defaults = TrainConfig()
    parser = commands.add_parser("train", help="train the paper's CapsNet on real digits",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder of MNIST's IDX files (plain or .gz); default: "
                                           "scikit-learn's 1,797 digits, split 80/20 with the seed")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="the global batch, split over torchrun's processes")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam's initial learning rate")
    parser.add_argument("--lr-decay", type=float, default=defaults.lr_decay,
                        help="learning rate x lr_decay every --lr-decay-steps steps, continuously")
    parser.add_argument("--lr-decay-steps", type=int, default=defaults.lr_decay_steps)
    parser.add_argument("--max-shift", type=int, default=defaults.max_shift,
                        help="random shifts of up to this many pixels (0: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--backend", default=defaults.backend, help="routing backend of DigitCaps")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph=True)")
    parser.add_argument("--out", default=defaults.out, help="folder for the checkpoint, history and pictures")
    parser.add_argument("--resume", help="checkpoint.pt to continue from")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--conv-channels", type=int, default=defaults.conv_channels)
    parser.add_argument("--primary-channels", type=int, default=defaults.primary_channels)
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="routing iterations")
    parser.add_argument("--limit", type=int, help="use only the first N training and test samples")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{name: value for name, value in vars(args).items() if name in fields})
    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

