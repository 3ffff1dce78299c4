"""DeepSpeed ZeRO 1/2/3 checkpoints: DeepSpeed's own files under the tag `deepspeed`, the training state
(step, loader position) as client state; loaded with weights-only torch.load plus the few DeepSpeed
classes its files hold, and consolidated to one whole model without a process group (zero_to_fp32).
deepspeed is imported only when one of these is called: it is slow to import and optional for the rest."""
from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from checkpoints.safe_load import safe_loading
from configs.errors import CheckpointError

CHECKPOINT_TAG = "deepspeed"


def is_deepspeed(directory: Path) -> bool:
    return (Path(directory) / "latest").is_file()


def checkpoint_globals() -> tuple:
    """The only non-tensor classes DeepSpeed's checkpoint files hold (read off ZeRO 1, 2 and 3 checkpoints);
    loading admits these and plain tensors/containers, nothing else (checkpoints/safe_load.py)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, ZeroStageEnum, fragment_address


def save(ds_engine, directory: Path, train_state: dict) -> None:
    """Model, optimizer and the train state as client state; DeepSpeed writes synchronously."""
    ds_engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"train_state": train_state})


def load(ds_engine, directory: Path, train_state: dict) -> None:
    with safe_loading(checkpoint_globals()):
        path, client_state = ds_engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    if path is None or client_state.get("train_state", {}).get("step") != train_state["step"]:
        raise CheckpointError(f"{directory}: no deepspeed checkpoint for step {train_state['step']} "
                              "(was it written by another engine?)")


def consolidated_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint of any ZeRO stage, in one process without a process
    group (DeepSpeed's zero_to_fp32), read with weights-only loading."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading(checkpoint_globals()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    # Activation checkpointing wraps each block; the plain model has no wrapper in its parameter names.
    return {name.replace(_CHECKPOINT_PREFIX, ""): tensor for name, tensor in state.items()}
