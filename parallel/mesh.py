"""The device mesh: how the world's ranks split into data-parallel replicas, data-parallel shards and
sequence slices.

Three named dimensions, outermost first: ``dp_replicate`` (HSDP replicas, typically across nodes),
``dp_shard`` (FSDP/ZeRO shards) and ``sp`` (sequence parallelism; ranks of one sp group hold the same rows,
each a contiguous slice of every row). Two flattened views are registered on the mesh:

- ``dp`` = dp_replicate x dp_shard: the data-parallel rank and size the loader slices rows by;
- ``dp_shard_sp`` = dp_shard x sp: the group FSDP shards parameters over. Sharding over the sp ranks as well
  (torchtitan's dp_shard_cp) costs nothing extra and makes FSDP's gradient reduce-scatter also sum the
  sp ranks' gradients, which sequence parallelism needs because every sp rank sees different tokens.
"""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp_replicate", "dp_shard", "sp")


def init_distributed(timeout_s: float = 600) -> torch.device:
    """Join the process group torchrun describes in the environment; returns this rank's device.

    A plain ``python`` run (no WORLD_SIZE) stays a single process without a process group. NCCL on CUDA,
    gloo on CPU. A collective that waits longer than timeout_s (a hung or dead rank) raises instead of
    hanging the job forever.
    """
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=timedelta(seconds=timeout_s), **_restart_safe_store(timeout_s))
    return device


def leave_process_group() -> None:
    """The end of a run that every rank reached: wait for the others, then tear the group down. A rank that
    exits with its group alive, or tears it down while a peer is still inside a collective, can abort at exit
    in gloo's threads ("terminate called without an active exception") and fail a finished job."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _restart_safe_store(timeout_s: float) -> dict:
    """Under torchrun the ranks rendezvous through the agent's store, which outlives a restart of the group
    (--max-restarts): the new ranks could read the dead ones' addresses from it and fail to connect
    ("Connection refused"). Keys are kept apart per restart attempt."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    world_size, timeout = int(os.environ["WORLD_SIZE"]), timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"baton/attempt_{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": world_size}


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dimensions, checked against the world size."""

    dp_replicate: int
    dp_shard: int
    sp: int
    world_size: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, sp: int, world_size: int) -> ParallelDims:
        """``dp_shard=-1`` takes whatever the other dimensions leave of the world size."""
        for name, size in (("dp_replicate", dp_replicate), ("sp", sp)):
            if size < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {size}")
        if dp_shard == -1:
            if world_size % (dp_replicate * sp):
                raise ValueError(
                    f"parallel.dp_shard=-1: world size {world_size} is not divisible by "
                    f"dp_replicate*sp = {dp_replicate}*{sp}"
                )
            dp_shard = world_size // (dp_replicate * sp)
        if dp_shard < 1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1, got {dp_shard}")
        if dp_replicate * dp_shard * sp != world_size:
            raise ValueError(
                f"parallel: dp_replicate*dp_shard*sp = {dp_replicate}*{dp_shard}*{sp} = "
                f"{dp_replicate * dp_shard * sp} must equal the world size {world_size}"
            )
        return cls(dp_replicate, dp_shard, sp, world_size)

    @property
    def dp(self) -> int:
        """Number of data-parallel ranks: distinct micro-batches per step."""
        return self.dp_replicate * self.dp_shard


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The (dp_replicate, dp_shard, sp) mesh with the flattened ``dp`` and ``dp_shard_sp`` views."""
    mesh = init_device_mesh(
        device_type, (dims.dp_replicate, dims.dp_shard, dims.sp), mesh_dim_names=MESH_DIMS
    )
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards on: 1D over dp_shard x sp, or 2D (HSDP) with dp_replicate outermost."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_sp"]
    return mesh["dp_shard_sp"]
