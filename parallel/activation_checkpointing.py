"""Activation checkpointing per block, for every engine (FSDP2 and DeepSpeed apply it the same way)."""
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model import LM


def apply_activation_checkpointing(model: LM) -> None:
    """Recompute each block's forward in the backward (non-reentrant, so the sp collectives inside a
    block simply run again, in the same order on every rank)."""
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)
