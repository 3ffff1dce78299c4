"""DeepSpeed ZeRO stage 1, 2 or 3 behind the same engine contract as FSDP (parallel/engine.py).

The model is built and initialised exactly as for the other engines, then handed to deepspeed, which
partitions optimizer states (1), gradients (2) and parameters (3) over all ranks. Sequence-parallel ranks
are data-parallel ranks to DeepSpeed: their gradients are averaged like any other rank's, which is what
sequence parallelism needs. The optimizer is DeepSpeed's AdamW with our parameter groups; on CPU it is
torch's AdamW (`torch_adam`), so nothing is compiled. Checkpoints are DeepSpeed's own, with the training
state (step, loader position) as client state.
"""
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from parallel.checkpoint import CheckpointError
from parallel.engine import Engine
from parallel.topology import Topology
from parallel.fsdp import apply_activation_checkpointing
from parallel.materialize import build_model
from parallel.safe_load import safe_loading
from training.optim import build_optimizer, set_lr

CHECKPOINT_TAG = "deepspeed"
# The only non-tensor classes DeepSpeed's checkpoint files hold (read off ZeRO 1, 2 and 3 checkpoints);
# loading admits these and plain tensors/containers, nothing else (parallel/safe_load.py).
DEEPSPEED_CHECKPOINT_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)


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
    def __init__(self, cfg, topology: Topology):
        deepspeed.init_distributed(dist_backend="nccl" if topology.device.type == "cuda" else "gloo")
        model = build_model(cfg.model, topology.device, cfg.run.seed)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        # The decay / no-decay split of training/optim.py; deepspeed owns the optimizer built from it.
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in build_optimizer(model, cfg.optim).param_groups]
        micro_steps = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topology.dp_size)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=deepspeed_config(cfg, topology, micro_steps))
        self.model = self.ds  # callable like the module; attributes (generate, ...) pass through
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
        self.ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"train_state": train_state})

    def load_state(self, directory: Path, train_state: dict) -> None:
        with safe_loading(DEEPSPEED_CHECKPOINT_GLOBALS):
            path, client_state = self.ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if path is None or client_state.get("train_state", {}).get("step") != train_state["step"]:
            raise CheckpointError(f"{directory}: no deepspeed checkpoint for step {train_state['step']} "
                                  "(was it written by another engine?)")


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a DeepSpeed checkpoint of any ZeRO stage, in one process without
    a process group (DeepSpeed's zero_to_fp32), read with weights-only loading."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading(DEEPSPEED_CHECKPOINT_GLOBALS):
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=CHECKPOINT_TAG)
    # Activation checkpointing wraps each block; the plain model has no wrapper in its parameter names.
    return {name.replace(_CHECKPOINT_PREFIX, ""): tensor for name, tensor in state.items()}
