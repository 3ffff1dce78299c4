"""Activation checkpointing, the same in every engine (one process, FSDP2, DeepSpeed): a checkpointed block
keeps only its input for the backward and recomputes its forward there.

Modes (`parallel.activation_checkpointing`), as torchtitan offers them per layer:
- none: every block keeps what its ops save (bench/activation_memory.py measures it per block type);
- full: every block is recomputed: the most memory saved, about one more forward of the blocks in time;
- selective: every Nth block (`parallel.activation_checkpointing_every`), blocks N-1, 2N-1, ...: memory and
  recomputation in between.
Non-reentrant checkpointing, so the sequence-parallel collectives inside a block simply run again in the
backward, in the same order on every rank. The wrapper's name never reaches checkpoints: state dicts
(nn.Module's and torch.distributed.checkpoint's) drop it.
"""
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model import LM
from parallel.config import ParallelConfig


def checkpointed_blocks(num_blocks: int, mode: str, every: int) -> list[int]:
    """The indices of the blocks `mode` recomputes in the backward."""
    if mode == "full":
        return list(range(num_blocks))
    if mode == "selective":
        return [index for index in range(num_blocks) if (index + 1) % every == 0]
    return []


def apply_activation_checkpointing(model: LM, cfg: ParallelConfig) -> None:
    """Wrap the blocks cfg.activation_checkpointing selects (in place; before any sharding wraps them)."""
    for index in checkpointed_blocks(len(model.blocks), cfg.activation_checkpointing,
                                     cfg.activation_checkpointing_every):
        model.blocks[index] = checkpoint_wrapper(model.blocks[index], preserve_rng_state=False)
