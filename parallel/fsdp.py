"""FSDP2: every block is a `fully_shard` unit, the root holds the embedding, final norm and head.

Parameters are sharded over dp_shard x sp (parallel/mesh.py), or HSDP (replicated over dp_replicate,
sharded within) when dp_replicate > 1. On CUDA the blocks compute in bf16 and reduce gradients in fp32.
The model arrives on the meta device and is materialised after sharding (parallel/materialize.py), so
no rank ever holds all of a large preset.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import LM
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.config import ParallelConfig


def apply_fsdp(model: LM, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> None:
    """Shard `model` in place: each block, then the root (the root is not resharded after forward,
    because the backward starts with the head that holds)."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if device.type == "cuda" and cfg.mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
