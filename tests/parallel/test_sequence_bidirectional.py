"""Bidirectional layers under sequence parallelism (sp = 2 and 4 gloo processes) equal one process: the forward
direction by scan's prefix combine, the backward one by scan_reverse's suffix combine (states from the following
ranks), combined as kernels/lion does; outputs and every input gradient, for LION (normalised, no decay, a scalar
decay) and bidirectional GLA / Mamba2 (not normalised, vector and scalar decays). Documents cross rank boundaries,
one starts exactly at a boundary, one spans every rank, slices are odd or two tokens long. The whole models are in
test_sequence_model.py's style at the end."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.lion import chunk_lion, combine_directions, with_normalizer, zero_gate
from model import LM
from model.gla import GLA_CORE
from parallel.sequence import SequenceParallel
from tests.parallel.test_sequence_ops import (BATCH, HEADS, KEY_DIM, VALUE_DIM, assert_close, document_layout, flat,
                                              full_cu_seqlens, local_batch, local_slice)
from tests.parallel.test_sequence_model import LOCAL_LEN, ROWS, VOCAB, batch_layout, cu_seqlens_of

CASES = {  # name: (gate shape after [B, T, H], normalised)
    "lion_lit": (None, True), "lion_scalar": ((), True), "gla_vector": ((KEY_DIM,), False),
    "mamba2_scalar": ((), False)}


def check_bidirectional(sp, case: str, doc_starts, rank: int, local_len: int) -> None:
    gate_shape, normalize = CASES[case]
    T = local_len * sp.size
    q, k = torch.randn(BATCH, T, HEADS, KEY_DIM), torch.randn(BATCH, T, HEADS, KEY_DIM) / KEY_DIM ** 0.5
    if normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    inputs = dict(q=q, k=k, v=torch.randn(BATCH, T, HEADS, VALUE_DIM))
    if gate_shape is not None:
        inputs["g"] = F.logsigmoid(torch.randn(BATCH, T, HEADS, *gate_shape) + 1)
    full = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    y_full = chunk_lion(**{name: flat(x) for name, x in full.items()}, scale=0.5, normalize=normalize,
                        cu_seqlens=full_cu_seqlens(doc_starts, T)).view(BATCH, T, HEADS, VALUE_DIM)
    weight = torch.randn_like(y_full)
    (y_full * weight).sum().backward()

    local = {name: local_slice(x, rank, local_len) for name, x in inputs.items()}
    q, k, v = local["q"], local["k"], local["v"]
    g = local["g"] if "g" in local else zero_gate(q)
    values = with_normalizer(v) if normalize else v
    o_forward = sp.scan(GLA_CORE, q, k, values, scale=0.5, g=g)
    o_backward = sp.scan_reverse(GLA_CORE, q, k, values, scale=0.5, g=g)
    y = combine_directions(o_forward, o_backward, q, k, values, 0.5, normalize, 1e-6)
    mine = slice(rank * local_len, (rank + 1) * local_len)
    assert_close(y, y_full[:, mine].detach(), f"{case} output")
    (y * weight[:, mine]).sum().backward()
    for name in inputs:
        assert_close(local[name].grad, full[name].grad[:, mine], f"{case} d{name}")


def run_op_checks(rank: int, world_size: int) -> None:
    for local_len in (7, 2):
        doc_starts = document_layout(world_size, local_len)
        cu, starts_document = local_batch(doc_starts, rank, local_len)
        sp = SequenceParallel(dist.group.WORLD, cu, starts_document)
        for case in CASES:
            torch.manual_seed(local_len)  # identical full inputs on every rank
            check_bidirectional(sp, case, doc_starts, rank, local_len)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_bidirectional_ops_match_single_process(spawn, world_size):
    spawn(run_op_checks, world_size)
