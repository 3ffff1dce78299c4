"""Build the model on the meta device, let the engine shard it, then allocate and initialise only the
local shards, with exactly the values a single process would have drawn.

Every engine builds its model this way, so a run's initial weights depend on the seed alone, not on the
engine, the world size or the sharding: that is what lets the tests demand equal losses across them.
The model's own `init_weights()` runs unchanged on the (sharded) parameters; its random in-place fills
(normal_, uniform_) are redirected to draw the *full* tensor from the CPU generator, as a single process
does, and each rank keeps its shard. One full parameter exists at a time, never the whole model.

FSDP2 shards through `fully_shard`; an engine with a layout of its own (DeepSpeed ZeRO-3) builds with
`shard_rows` and takes the initialised shards over one module at a time (parallel/deepspeed.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.overrides import TorchFunctionMode

from checkpoints.initial import copy_full, load_weights
from model import LM

# Random fills drawn whole: the tensor methods, and nn.init's (which also need the full shape for fans).
RANDOM_FILLS = {
    torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_,
    nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
    nn.init.orthogonal_,
}
UNSUPPORTED_RANDOM_FILLS = {
    torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.random_, torch.Tensor.cauchy_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_, nn.init.sparse_,
}


class _FullTensorRandomFills(TorchFunctionMode):
    """Redirects in-place random fills to a full CPU draw, sliced to the local shard."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in UNSUPPORTED_RANDOM_FILLS:
            raise NotImplementedError(f"{func.__name__} in init_weights: add it to parallel/materialize.py")
        if func not in RANDOM_FILLS:
            return func(*args, **kwargs)
        # The filled tensor is the first argument (tensor methods; nn.init called directly) or `tensor=`
        # (nn.init dispatched here through __torch_function__).
        target = args[0] if args else kwargs["tensor"]
        full = torch.empty(target.shape, dtype=target.dtype)
        if args:
            func(full, *args[1:], **kwargs)
        else:
            func(**dict(kwargs, tensor=full))
        copy_full(target, full)  # every rank drew the same full tensor: each keeps its shard
        return target


def build_model(model_cfg, device: torch.device, seed: int,
                shard: Callable[[LM], None] | None = None, initial_weights=None) -> LM:
    """The model for `model_cfg`, sharded by `shard` (if given) and initialised from `seed` on `device`, then
    given `initial_weights` (checkpoints/initial.py: a run's init.from) if any, a full tensor at a time."""
    with torch.device("meta"):
        model = LM.from_config(model_cfg)
    if shard is not None:
        shard(model)
    tied = _tied_parameters(model)
    model.to_empty(device=device)
    for (module, name), *others in tied:  # to_empty allocates each module's parameter separately
        for other, other_name in others:
            setattr(other, other_name, getattr(module, name))
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        with _FullTensorRandomFills():
            model.init_weights()
    if initial_weights is not None:
        load_weights(model, initial_weights)
    return model


def shard_rows(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every parameter of the meta-device `model` as a DTensor split by rows over the 1-D `mesh` (tied
    parameters stay one), so that `build_model` allocates and initialises 1/mesh.size() of each on a rank."""
    sharded: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in sharded:  # meta tensors: nothing to send, each rank just takes its rows
                rows = distribute_tensor(param, mesh, [Shard(0)], src_data_rank=None)
                sharded[id(param)] = nn.Parameter(rows, requires_grad=param.requires_grad)
            setattr(module, name, sharded[id(param)])


def _tied_parameters(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """Groups of (module, attribute) that hold the same parameter (e.g. a tied embedding and head)."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    return [group for group in owners.values() if len(group) > 1]
