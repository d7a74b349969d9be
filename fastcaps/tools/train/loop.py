"""``fastcaps train``: the paper's CapsNet (``fastcaps.CapsNet`` + ``CapsuleLoss``; with
``--model conv``, with a ConvCaps2d layer before DigitCaps; with ``--model em``, a MatrixCapsNet
with EM routing and the spread loss, models.py) trained on real digits, with the paper's
optimiser (Adam, learning rate 1e-3 decayed exponentially), its augmentation (shifts of up to 2
pixels) and, for CapsNet, its reconstruction regulariser.

Data: scikit-learn's 1,797 scanned digits by default, MNIST's IDX files with --data-dir, or
with --model em smallNORB's files (sources.py, data.py, smallnorb.py). Output, in --out: checkpoint.pt (model, optimiser, schedule, epoch and
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

import dataclasses
import json
import os
import time
from typing import Dict, List, Tuple

import torch

from .augment import epoch_batches
from .config import MODEL_FIELDS, TrainConfig
from .data import Digits
from .distributed import Processes, process_slice, start_processes, sum_over_processes, training_device
from .models import Task, task_for
from .plots import save_curves, save_reconstructions
from .sources import load_training_data

__all__ = ["train", "evaluate", "build_model"]


def build_model(config: TrainConfig, device: torch.device, in_channels: int = 1,
                num_classes: int = 10) -> torch.nn.Module:
    """The model of ``config`` (models.py), initialised from its seed."""
    torch.manual_seed(config.seed)
    return task_for(config).build(device, in_channels, num_classes)


def evaluate(model, data: Digits, batch_size: int, processes: Processes, device: torch.device,
             task: Task, loss_fn: torch.nn.Module, view=lambda images: images) -> Tuple[float, float]:
    """Mean loss and accuracy over data; each process takes every world-th sample."""
    mine = torch.arange(processes.rank, len(data.labels), processes.world)
    total_loss = correct = 0.0
    model.eval()
    with torch.no_grad():
        for indices in mine.split(batch_size):
            images, labels = view(data.images[indices]).to(device), data.labels[indices].to(device)
            output = task.forward(model, images, None)
            total_loss += task.loss(loss_fn, output, images, labels).item() * len(indices)
            correct += (task.scores(output).argmax(1) == labels).sum().item()
    total_loss, correct = sum_over_processes([total_loss, correct], processes, device)
    count = max(len(data.labels), 1)
    return total_loss / count, correct / count


def _resume(config: TrainConfig, model, optimizer, schedule, loss_fn) -> Tuple[int, List[Dict]]:
    state = torch.load(config.resume, map_location="cpu", weights_only=True)
    saved = state["config"]
    different = [f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
                 for name in MODEL_FIELDS if saved.get(name) != getattr(config, name)]
    if different:
        raise ValueError(f"fastcaps train: --resume {config.resume} was trained with other settings ("
                         + "; ".join(different) + ")")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    loss_fn.load_state_dict(state["loss"])
    return state["epoch"], state["history"]


def _say(processes: Processes, text: str) -> None:
    if processes.main:
        print(text, flush=True)


def train(config: TrainConfig) -> List[Dict]:
    """Runs the training that config describes and returns its history, one dict per epoch."""
    from tqdm import tqdm

    device = training_device(config)
    processes = start_processes(device)
    if config.batch_size % processes.world:
        raise ValueError(f"fastcaps train: batch_size {config.batch_size} must be a multiple of the "
                         f"{processes.world} processes")
    data = load_training_data(config)
    train_set, test_set = data.train, data.test
    if len(train_set.labels) < config.batch_size:
        raise ValueError(f"fastcaps train: batch_size {config.batch_size} is larger than the "
                         f"{len(train_set.labels)} training samples")
    task = task_for(config)
    model = build_model(config, device, data.in_channels, data.num_classes)
    loss_fn = task.make_loss().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.lr_decay ** (step / config.lr_decay_steps))
    start_epoch, history = _resume(config, model, optimizer, schedule, loss_fn) if config.resume else (0, [])

    runner = torch.compile(model, fullgraph=True) if config.compile else model
    if processes.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    local = config.batch_size // processes.world
    image_shape = tuple(data.test_view(test_set.images[:1]).shape[1:])
    _say(processes, f"fastcaps train: {len(train_set.labels)} training and {len(test_set.labels)} test images "
                    f"({data.name}), {image_shape}; model {config.model}, backend {task.backend(model)}, "
                    f"device {device}, {processes.world} process(es); batch {config.batch_size}, epochs "
                    f"{start_epoch + 1}-{config.epochs}")
    os.makedirs(config.out, exist_ok=True)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        batches, generator = epoch_batches(len(train_set.labels), config.batch_size, config.seed, epoch)
        runner.train()  # evaluate() left the runner (and any DDP or compile wrapper) in eval mode
        total_loss = correct = seen = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not (config.progress and processes.main))
        for indices in bar:
            images = process_slice(data.train_view(train_set.images[indices], generator), processes).to(device)
            labels = train_set.labels[process_slice(indices, processes)].to(device)
            optimizer.zero_grad(set_to_none=True)
            output = task.forward(runner, images, labels)
            loss = task.loss(loss_fn, output, images, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_loss = loss.item()
            total_loss += step_loss * local
            correct += (task.scores(output).detach().argmax(1) == labels).sum().item()
            seen += local
            bar.set_postfix(loss=f"{step_loss:.4f}")
        total_loss, correct, seen = sum_over_processes([total_loss, correct, seen], processes, device)
        test_loss, test_accuracy = evaluate(runner, test_set, config.batch_size, processes, device, task, loss_fn,
                                            data.test_view)
        task.epoch_done(loss_fn)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                        "test_loss": test_loss, "test_accuracy": test_accuracy,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started})
        _say(processes, f"epoch {epoch + 1}/{config.epochs}: train loss {total_loss / seen:.4f} "
                        f"accuracy {correct / seen:.2%} | test loss {test_loss:.4f} accuracy {test_accuracy:.2%} "
                        f"| {history[-1]['seconds']:.1f} s")
        if processes.main:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "loss": loss_fn.state_dict(), "epoch": epoch + 1,
                        "history": history,
                        "config": dataclasses.asdict(config)}, os.path.join(config.out, "checkpoint.pt"))
    if processes.main:
        with open(os.path.join(config.out, "history.json"), "w") as handle:
            json.dump(history, handle, indent=1)
        if task.reconstructs:
            save_reconstructions(model, test_set, os.path.join(config.out, "reconstructions.png"), device)
        save_curves(history, os.path.join(config.out, "curves.png"))
        if history:
            seconds = sum(entry["seconds"] for entry in history)
            pictures = "reconstructions.png, curves.png" if task.reconstructs else "curves.png"
            print(f"test accuracy {history[-1]['test_accuracy']:.2%} after {history[-1]['epoch']} epochs; "
                  f"this run's epochs took {seconds:.0f} s. Wrote {config.out}/checkpoint.pt, history.json, "
                  f"{pictures}", flush=True)
    return history
