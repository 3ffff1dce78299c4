"""Which rank holds which data: torchrun's process group laid out on the device mesh.

A plain `python train.py` is one process with no process group; under torchrun every rank joins the
group (gloo on CPU, NCCL on CUDA, with parallel.timeout_s as the collective timeout) and gets its data-
and sequence-parallel coordinates from the mesh.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from configs.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims, build_mesh, init_distributed


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
        raise ConfigError(f"parallel.engine=none runs one process, but torchrun started {world_size}: "
                         "use parallel=fsdp or parallel=deepspeed_zero{1,2,3}")
    if engine != "none" and not launched:
        raise ConfigError(f"parallel.engine={engine} needs torchrun (torchrun --nproc_per_node=1 train.py ... "
                         "for a single process)")
    dims = ParallelDims.resolve(cfg.dp_replicate, cfg.dp_shard, cfg.sp, world_size)
    device = init_distributed(cfg.timeout_s)
    if engine == "none":
        return Topology(device=device)
    mesh = build_mesh(dims, device.type)
    return Topology(rank=dist.get_rank(), world_size=world_size, dp_rank=mesh["dp"].get_local_rank(),
                    dp_size=dims.dp, sp_rank=mesh["sp"].get_local_rank(), sp_size=dims.sp, device=device,
                    mesh=mesh, engine=engine)
