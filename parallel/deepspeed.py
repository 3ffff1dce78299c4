"""DeepSpeed ZeRO stage 1, 2 or 3 behind the same engine contract as FSDP (parallel/engine.py).

The model is built and initialised exactly as for the other engines (parallel/materialize.py), then handed
to deepspeed, which partitions optimizer states (1), gradients (2) and parameters (3) over all ranks.
ZeRO-1/2 keep a whole fp32 model on every rank by design, so they build it whole. ZeRO-3 never has it
whole on a rank: the build splits every parameter by rows over the ranks, then `partition_for_zero3`
hands the parameters to ZeRO-3 one module at a time (gathered whole, partitioned, the whole copy freed),
so a rank holds its share of the model plus at most one module's parameters (the largest: the embedding).
In training ZeRO-3 gathers, prefetches and reduces by one block, FSDP2's unit (`zero3_buckets`), not by
DeepSpeed's GPU-sized defaults, under which a CPU rank held the whole model's gradient in the reduction
bucket; and a CPU rank's fp32 partition is not copied again as master weights (`alias_fp32_master_weights`).

Sequence-parallel ranks are data-parallel ranks to DeepSpeed: their gradients are averaged like any other
rank's, which is what sequence parallelism needs. The optimizer is DeepSpeed's AdamW with our parameter
groups; on CPU it is torch's AdamW (`torch_adam`), so nothing is compiled. Checkpoints are DeepSpeed's own
(checkpoints/deepspeed.py), with the training state (step, loader position) as client state.
"""
from functools import partial
from pathlib import Path

import deepspeed
from deepspeed.utils import set_z3_leaf_modules
import torch
from torch import nn

from checkpoints import deepspeed as deepspeed_checkpoint
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.engine import Engine
from parallel.materialize import build_model, shard_rows
from parallel.topology import Topology
from training.optim import build_optimizer, set_lr


def deepspeed_config(cfg, topology: Topology, micro_steps: int) -> dict:
    on_cuda = topology.device.type == "cuda"
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": not on_cuda}},
        "bf16": {"enabled": on_cuda and cfg.parallel.mixed_precision},
        "steps_per_print": 1 << 30,  # the loop logs; keep deepspeed quiet
    }


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, topology: Topology, initial_weights=None):
        deepspeed.init_distributed(dist_backend="nccl" if topology.device.type == "cuda" else "gloo")
        micro_steps = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topology.dp_size)
        config = deepspeed_config(cfg, topology, micro_steps)
        model, groups = build_zero_model(cfg, topology, config, initial_weights)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        if cfg.parallel.zero_stage == 3:
            alias_fp32_master_weights(self.optimizer)
        self.model = _Model(self.ds)
        self.topology = topology

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the number of micro-batches; deepspeed counts them and applies the
        # update at the accumulation boundary, which `step` reaches.
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def step(self, lr: float) -> float:
        set_lr(self.optimizer, lr)
        self.ds.step()
        return float(self.ds.get_global_grad_norm())

    def save_state(self, directory: Path, train_state: dict, asynchronous: bool = False, group=None) -> None:
        """DeepSpeed writes its own files, synchronously (no future to wait for)."""
        deepspeed_checkpoint.save(self.ds, directory, train_state)

    def load_state(self, directory: Path, train_state: dict) -> None:
        deepspeed_checkpoint.load(self.ds, directory, train_state)


class _Model:
    """The engine's `model`: calls run DeepSpeed's forward (its ZeRO hooks), every other attribute is the LM's.
    DeepSpeed's engine passes unknown attributes through itself, but its own `step` (the optimizer's) would
    hide the LM's (the recurrent decode step the evaluation uses)."""

    def __init__(self, ds: deepspeed.DeepSpeedEngine):
        self._ds = ds

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._ds.module, name)


def build_zero_model(cfg, topology: Topology, config: dict, initial_weights=None) -> tuple[nn.Module, list[dict]]:
    """The model as deepspeed.initialize takes it (ZeRO-3: already partitioned, and `config` given the bucket
    sizes of `zero3_buckets`), and its parameter groups; initial_weights: parallel/materialize.py's build_model."""
    zero3 = cfg.parallel.zero_stage == 3
    # DeepSpeed has no dp_replicate: dp_shard x sp is the whole world.
    shard = partial(shard_rows, mesh=topology.mesh["dp_shard_sp"]) if zero3 else None
    model = build_model(cfg.model, topology.device, cfg.run.seed, shard, initial_weights)
    apply_activation_checkpointing(model, cfg.parallel)
    if cfg.train.compile:
        apply_compile(model)
    # The decay / no-decay split of training/optim.py, by name: ZeRO-3 replaces the parameters, and its
    # partitioned ones no longer show their shapes. Deepspeed owns the optimizer built from these groups.
    names = {id(p): name for name, p in model.named_parameters()}
    split = [([names[id(p)] for p in g["params"]], g["weight_decay"])
             for g in build_optimizer(model, cfg.optim).param_groups]
    if zero3:
        config["zero_optimization"].update(zero3_buckets(model, cfg.parallel.reshard_after_forward))
        # A recurrent mixer uses its submodules' parameters inside its own autograd Function (model/recurrent.py
        # mix), outside those submodules' forwards: ZeRO-3 gathers a leaf module's parameters whole as it runs.
        set_z3_leaf_modules(model, list({type(block.mixer) for block in model.blocks}))
        partition_for_zero3(model, config)
    params = dict(model.named_parameters())
    return model, [{"params": [params[name] for name in group], "weight_decay": decay} for group, decay in split]


def zero3_buckets(model: nn.Module, reshard_after_forward: bool) -> dict:
    """ZeRO-3's gathering, prefetching, gradient reduction and optimizer sub-groups sized by the largest block,
    the unit FSDP2 gathers and reduces (parallel/fsdp.py), in numbers of parameters. DeepSpeed's defaults
    (zero/config.py), sized for GPUs, hold much more than a rank's share (parallel/README.md, ZeRO-3 memory):
    - stage3_max_reuse_distance 1e9: a parameter used again within 1e9 parameters' worth of modules stays
      gathered, so the whole model stays gathered from its forward to its backward. Here 0 when the blocks
      reshard after forward (`parallel.reshard_after_forward`, as FSDP2), else the whole model;
    - reduce_bucket_size 5e8: whole gradients wait in the bucket until 5e8 of them fill it, i.e. the whole
      model's gradient before any is reduced and partitioned; here one block's;
    - sub_group_size 1e9: the optimizer's fp32 gradient buffer has the whole size of the largest sub-group
      (stage3.py initialize_optimizer_states, though a rank fills only its partition), i.e. of the model;
      here a block's (a larger single parameter, the embedding, makes a sub-group of its own);
    - stage3_prefetch_bucket_size 5e7 and stage3_max_live_parameters 1e9: one block prefetched while one runs.
    Called on the row-sharded model (parallel/materialize.py shard_rows): a DTensor's numel is the whole one."""
    block_numel = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    return {
        "stage3_max_reuse_distance": 0 if reshard_after_forward else sum(p.numel() for p in model.parameters()),
        "reduce_bucket_size": block_numel,
        "sub_group_size": block_numel,
        "stage3_prefetch_bucket_size": block_numel,
        "stage3_max_live_parameters": 2 * block_numel,
    }


def alias_fp32_master_weights(optimizer) -> None:
    """Free ZeRO-3's second fp32 copy of a rank's partition where the parameters are fp32 already (CPU).
    DeepSpeed means to keep no master copy then, the optimizer updating the parameters' flat partitions
    themselves (zero/stage3.py `_create_fp32_partitions`: the master groups are "aliases"), but it tests the
    device by comparing the partition's torch.device with the accelerator's device name, a str, which never
    compare equal: each rank held its partition twice. The master tensors stay the objects the optimizer's
    groups and state refer to, only their storage becomes the parameters'; the values are equal (a clone),
    and DeepSpeed's later copies between the two (after a step, on loading a checkpoint) become copies onto
    themselves."""
    for master, partition in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat,
                                 strict=True):
        if master.dtype == partition.dtype and master.device == partition.device:
            master.data = partition.data


def partition_for_zero3(model: nn.Module, config: dict) -> None:
    """Swap the row-sharded parameters of `model` (materialize.shard_rows) for ZeRO-3 partitions, one module
    at a time: its parameters gathered whole, then `zero.Init(module=...)` keeps this rank's slice of each
    flattened parameter and frees the whole copy. Children go before their parents, so each zero.Init finds
    only the module's own parameters still to convert."""
    # deepspeed.initialize casts a whole model to bf16 itself, but expects a zero.Init one already cast.
    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    converted: dict[int, nn.Parameter] = {}  # a row-sharded parameter's id -> its ZeRO-3 parameter
    for module in _children_first(model):
        own = list(module.named_parameters(recurse=False))
        for name, param in own:
            if id(param) not in converted:  # a tied parameter is gathered once
                whole = param.full_tensor().to(dtype)
                converted[id(param)] = nn.Parameter(whole, requires_grad=param.requires_grad)
            setattr(module, name, converted[id(param)])
        if own:
            deepspeed.zero.Init(module=module, config_dict_or_path=config)


def _children_first(module: nn.Module):
    for child in module.children():
        yield from _children_first(child)
    yield module
