"""Sequence parallelism keeps the memory work: under sp = 2 (2 gloo processes) every recurrent mixer runs the
recomputation around the scan (model/recurrent.py mix), so on every rank a mixer keeps exactly what it keeps in
one process, and a block at most 1.3x an attention block in one process (tests/model/test_memory.py's budget)."""
import torch
import torch.distributed as dist

from model.lm import Block
from model.memory import saved_bytes
from model.registry import by_letter
from parallel.sequence import SequenceParallel
from tests.model.test_memory import RECURRENT_LETTERS, block_bytes_per_token, budget_config


def sp_context(tokens: int) -> dict:
    """A block's keyword arguments on this rank: one row of `tokens` local tokens, one document from rank 0."""
    group = dist.group.WORLD
    sp = SequenceParallel(group, torch.tensor([0, tokens], dtype=torch.int32),
                          torch.tensor([dist.get_rank(group) == 0]))
    return dict(cu_seqlens=sp.cu_seqlens, sp=sp)


def run_checks(rank: int, world_size: int) -> None:
    config = budget_config()
    attention = block_bytes_per_token(config, "A")
    for letter in RECURRENT_LETTERS:
        torch.manual_seed(0)
        mixer = Block(config, by_letter()[letter].name).mixer.train()
        x = torch.randn(1, 64, config.d_model, requires_grad=True)
        one_process, under_sp = saved_bytes(mixer, x), saved_bytes(mixer, x, **sp_context(64))
        assert under_sp == one_process, f"{letter} mixer on rank {rank}: {under_sp} bytes under sp, {one_process} alone"
        ratio = block_bytes_per_token(config, letter, sp_context) / attention
        assert ratio <= 1.3, f"{letter} block on rank {rank} keeps {ratio:.2f}x an attention block under sp"


def test_recurrent_blocks_keep_their_budget_under_sequence_parallel(spawn):
    spawn(run_checks, 2)
