"""The seam between the training loop and how the model is distributed.

train.py sees a Topology (which rank holds which data) and an Engine (the module to call, backward,
optimizer step, checkpoint state). The single-process engine here is the reference every distributed
engine must reproduce, loss for loss.
"""
import os
from dataclasses import dataclass

import torch

from configs.schema import OptimConfig
from parallel.config import ParallelConfig
from training.optim import build_optimizer, set_lr


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_topology(cfg: ParallelConfig) -> Topology:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 or cfg.engine != "none" or cfg.sp > 1:
        raise ValueError("parallel: this build runs a single process only (engine=none, sp=1, no torchrun)")
    return Topology(device=default_device())


class LocalEngine:
    """One process, one device, no sharding."""

    def __init__(self, model: torch.nn.Module, optim_cfg: OptimConfig, topology: Topology):
        self.topology = topology
        self.model = model.to(topology.device)
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.grad_clip = optim_cfg.grad_clip

    def sequence_parallel(self, batch: dict):
        """The per-batch sequence-parallel context the model's mixers call (None: the whole row is here)."""
        return None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        """Clip, update, zero the gradients; return the global gradient norm before clipping."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def all_reduce_mean(self, value: float) -> float:
        return value


def build_engine(cfg, model: torch.nn.Module, topology: Topology) -> LocalEngine:
    return LocalEngine(model, cfg.optim, topology)
