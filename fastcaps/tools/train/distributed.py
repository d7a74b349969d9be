"""``fastcaps train`` under torchrun: one process, or the group torchrun started, each taking an
equal slice of every global batch (so DDP's average of their gradients is the whole batch's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

from .config import TrainConfig

__all__ = ["Processes", "start_processes", "process_slice", "sum_over_processes", "training_device"]


@dataclass
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(device: torch.device) -> Processes:
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


def sum_over_processes(values: List[float], processes: Processes, device: torch.device) -> List[float]:
    if processes.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def training_device(config: TrainConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"fastcaps train: --device {config.device} asked for CUDA, which this machine lacks")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device
