"""The seam between the training loop and how the model is distributed.

train.py sees a Topology (which rank holds which data) and an Engine: the module to call, the sequence-
parallel context of a batch, backward, the optimizer step, and the model/optimizer part of checkpoints.
Three engines, one contract: `none` (one process, the reference), `fsdp` (FSDP2, parallel/fsdp.py) and
`deepspeed` (ZeRO 1/2/3, parallel/deepspeed.py). Every engine builds the model through
parallel/materialize.py, so the initial weights, and therefore the losses, do not depend on the engine.

Losses: each rank's loss is the mean over its own tokens; every rank holds the same number of tokens, and
the engines average gradients over all data- and sequence-parallel ranks, which makes the gradient that of
the mean over all tokens of the global batch, exactly as in one process.
"""
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpoints import dcp
from configs.schema import OptimConfig
from parallel.sequence import SequenceParallel
from parallel.topology import Topology
from training.optim import build_optimizer, set_lr


class Engine:
    """A model held whole (one process) or sharded by FSDP2. FSDP's collectives run inside the module's
    hooks, so backward, step and checkpoints are the same code for both; only the build differs."""

    def __init__(self, model: torch.nn.Module, optim_cfg: OptimConfig, topology: Topology):
        self.topology = topology
        self.model = model
        self.optimizer = build_optimizer(model, optim_cfg)
        self.grad_clip = optim_cfg.grad_clip

    def sequence_parallel(self, batch: dict) -> SequenceParallel | None:
        """The per-batch sequence-parallel context the model's mixers call (None: whole rows are here)."""
        if self.topology.sp_size == 1:
            return None
        return SequenceParallel.from_batch(self.topology.mesh["sp"].get_group(), batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        """Clip, update, zero the gradients; return the global gradient norm before clipping. A non-finite
        norm (a NaN or inf anywhere, on any rank) skips the update: parameters and optimizer state stay."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # sharded gradients: the norm is a partial sum over the shards
            norm = norm.full_tensor()
        if torch.isfinite(norm):
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, norm)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reduce_step(self, loss: float, stop: bool) -> tuple[float, bool]:
        """One all-reduce per step: the mean of the ranks' losses (each over the same number of tokens), and
        whether any rank was asked to stop, so that every rank stops after the same step."""
        if self.topology.world_size == 1:
            return loss, stop
        values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=self.topology.device)
        dist.all_reduce(values)
        return float(values[0]) / self.topology.world_size, bool(values[1] > 0)

    def save_state(self, directory: Path, train_state: dict, asynchronous: bool = False,
                   group: dist.ProcessGroup | None = None) -> Future | None:
        """Model and optimizer into `directory` (torch.distributed.checkpoint, sharded as held). Asynchronous:
        the state is copied to memory now and written by a background thread (collectives on `group`);
        returns the future of that write."""
        return dcp.save(directory, self.model, self.optimizer, asynchronous, group)

    def load_state(self, directory: Path, train_state: dict) -> None:
        dcp.load(directory, self.model, self.optimizer)
