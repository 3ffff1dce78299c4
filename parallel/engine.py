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
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from configs.schema import OptimConfig
from parallel.config import ParallelConfig
from parallel.fsdp import apply_fsdp
from parallel.materialize import build_model
from parallel.mesh import ParallelDims, build_mesh, fsdp_mesh, init_distributed
from parallel.sequence import SequenceParallel
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
    mesh: DeviceMesh | None = None  # None in a single process
    engine: str = "none"  # the engine `auto` resolved to

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_topology(cfg: ParallelConfig) -> Topology:
    """Join torchrun's process group (if any) and lay the ranks out on the mesh."""
    launched = "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    engine = cfg.engine if cfg.engine != "auto" else ("fsdp" if world_size > 1 else "none")
    if engine == "none" and world_size > 1:
        raise ValueError(f"parallel.engine=none runs one process, but torchrun started {world_size}: "
                         "use parallel=fsdp or parallel=deepspeed_zero{1,2,3}")
    if engine != "none" and not launched:
        raise ValueError(f"parallel.engine={engine} needs torchrun (torchrun --nproc_per_node=1 train.py ... "
                         "for a single process)")
    dims = ParallelDims.resolve(cfg.dp_replicate, cfg.dp_shard, cfg.sp, world_size)
    device = init_distributed()
    if engine == "none":
        return Topology(device=device)
    mesh = build_mesh(dims, device.type)
    return Topology(rank=dist.get_rank(), world_size=world_size, dp_rank=mesh["dp"].get_local_rank(),
                    dp_size=dims.dp, sp_rank=mesh["sp"].get_local_rank(), sp_size=dims.sp, device=device,
                    mesh=mesh, engine=engine)


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
        """Clip, update, zero the gradients; return the global gradient norm before clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # sharded gradients: the norm is a partial sum over the shards
            norm = norm.full_tensor()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a per-rank number over all ranks (each rank's loss is over the same number of tokens)."""
        if self.topology.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.topology.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.topology.world_size

    def save_state(self, directory: Path, train_state: dict) -> None:
        """Model and optimizer into `directory` (torch.distributed.checkpoint, sharded as held)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))

    def load_state(self, directory: Path, train_state: dict) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def build_engine(cfg, topology: Topology):
    """Build the model for `cfg.model` the way `topology.engine` holds it, and its engine."""
    if topology.engine == "deepspeed":
        from parallel.deepspeed import DeepSpeedEngine  # imports deepspeed: only when asked for

        return DeepSpeedEngine(cfg, topology)
    shard = None
    if topology.engine == "fsdp":
        shard = partial(apply_fsdp, mesh=fsdp_mesh(topology.mesh), cfg=cfg.parallel, device=topology.device)
    model = build_model(cfg.model, topology.device, cfg.run.seed, shard)
    return Engine(model, cfg.optim, topology)

