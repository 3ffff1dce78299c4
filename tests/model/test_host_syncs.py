"""A training step's layers never read the device from the host (ARCHITECTURE.md, "Performance on the GPU").

Sequence bounds and chunk tables come once per batch: attached to cu_seqlens on the host (as the training
loop does, kernels.common.attach_host_bounds) and shared by every layer. So the host reads in one forward
and backward of a packed batch are the same for 2 layers as for 4, and the recurrent layers make none at all
once the bounds are attached: the ParaRNN layers (U, L) too, whose Newton iterations test convergence on the
device (model/pararnn.py). The kernels run the GPU's path (Triton, interpreted on CPU); attention takes the
CPU's query-block path, which reads its blocks' key ranges on the host once per batch (on CUDA FlexAttention
reads none).
"""
import os

import pytest
import torch

from kernels import chunk_block_diagonal_scan, chunk_diagonal_scan
from kernels.block_diagonal_scan.naive import naive_block_diagonal_scan
from kernels.common import attach_host_bounds
from kernels.diagonal_scan.naive import naive_diagonal_scan
from model import pararnn
from model.config import ParaRNNConfig
from training.host_syncs import HostSyncs

if not torch.cuda.is_available():  # before the first Triton kernel is decorated (see tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
VOCAB = 97  # tests/model/conftest.py's small models
ROW = 70
CU_SEQLENS = [0, 7, 70, 71, 100, 140]


def step_syncs(lm, attached: bool) -> HostSyncs:
    ids = torch.randint(0, VOCAB, (2, ROW))
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    if attached:  # what the training loop knows on the host before the batch moves to the device
        cu_seqlens = attach_host_bounds(cu_seqlens.clone(), torch.tensor(CU_SEQLENS))
    with HostSyncs() as syncs:
        lm(ids, cu_seqlens=cu_seqlens).float().logsumexp(-1).mean().backward()
    return syncs


def test_host_reads_do_not_grow_with_depth(make_lm, monkeypatch):
    """The bounds are read once per batch and shared. The recurrent ops all read them through kernels.common's
    sequence bounds (one representative here: GLA; the next test shows that every recurrent mixer reads
    nothing else), the window and full attention layers their key ranges."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    pattern = "GWA"
    shallow, deep = make_lm(pattern).train(), make_lm(pattern * 2).train()
    counts = step_syncs(shallow, attached=False).counts
    assert counts == step_syncs(deep, attached=False).counts
    assert counts["Tensor.tolist"] >= 1  # the bounds, read once


def test_recurrent_layers_read_nothing_with_the_bounds_attached(make_lm, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", "triton")
    # a mixer per recurrent op (DeltaNet, E, runs Gated DeltaNet's)
    assert step_syncs(make_lm("DMGPX").train(), attached=True).counts == {}



@pytest.mark.parametrize("lstm", ["peephole", "hc"])
def test_newton_layers_read_nothing_with_the_bounds_attached(make_lm, monkeypatch, lstm):
    """The GRU and LSTM layers (the diagonal scan; the block-diagonal scan for the LSTM through (h, c)): no read
    per Newton iteration nor per layer. Their scans are the naive loops here (the same contract, no host read with
    the bounds attached, and quick: 16 scans a layer through the interpreter would take minutes); the Triton scans
    themselves read nothing either (the next test)."""
    monkeypatch.setattr(pararnn, "chunk_diagonal_scan", naive_diagonal_scan)
    monkeypatch.setattr(pararnn, "chunk_block_diagonal_scan", naive_block_diagonal_scan)
    lm = make_lm("UL", pararnn=ParaRNNConfig(num_heads=2, width=32, lstm=lstm)).train()
    assert step_syncs(lm, attached=True).counts == {}
    assert [block.mixer.newton_plan for block in lm.blocks] == [15, 15]  # every iteration ran (predicated)


@pytest.mark.parametrize("op", [chunk_diagonal_scan, chunk_block_diagonal_scan], ids=["diagonal", "block_diagonal"])
def test_newton_scans_read_nothing_with_the_bounds_attached(monkeypatch, op):
    """One Triton scan forward and backward (interpreted here) over the packed batch of step_syncs."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    block = (2,) if op is chunk_block_diagonal_scan else ()
    b = torch.randn(1, CU_SEQLENS[-1], 1, 16, *block, requires_grad=True)
    a = (0.5 * torch.randn(*b.shape, *block)).requires_grad_()
    initial_state = torch.randn(len(CU_SEQLENS) - 1, 1, 16, *block, requires_grad=True)
    cu_seqlens = attach_host_bounds(torch.tensor(CU_SEQLENS, dtype=torch.int32), torch.tensor(CU_SEQLENS))
    with HostSyncs() as syncs:
        h, final = op(a, b, initial_state, True, cu_seqlens)
        (h.sum() + final.sum()).backward()
    assert syncs.counts == {}
