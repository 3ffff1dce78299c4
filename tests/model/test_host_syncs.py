"""A training step's layers never read the device from the host (ARCHITECTURE.md, "Performance on the GPU").

Sequence bounds and chunk tables come once per batch: attached to cu_seqlens on the host (as the training
loop does, kernels.common.attach_host_bounds) and shared by every layer. So the host reads in one forward
and backward of a packed batch are the same for 2 layers as for 4, and the recurrent layers make none at all
once the bounds are attached. The kernels run the GPU's path (Triton, interpreted on CPU); attention takes the
CPU's query-block path, which reads its blocks' key ranges on the host once per batch (on CUDA FlexAttention
reads none).
"""
import os

import pytest
import torch

from kernels.common import attach_host_bounds
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
    monkeypatch.setenv("BATON_KERNELS", "triton")
    pattern = "DMWGPA"
    shallow, deep = make_lm(pattern).train(), make_lm(pattern * 2).train()
    counts = step_syncs(shallow, attached=False).counts
    assert counts == step_syncs(deep, attached=False).counts
    assert counts["Tensor.tolist"] >= 1  # the bounds, read once


def test_recurrent_layers_read_nothing_with_the_bounds_attached(make_lm, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", "triton")
    assert step_syncs(make_lm("DMGEPX").train(), attached=True).counts == {}
