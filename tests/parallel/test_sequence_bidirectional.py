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


TINY = dict(vocab_size=VOCAB, d_model=32, bidirectional=True, gla=dict(num_heads=2, use_short_conv=True),
            mamba2=dict(head_dim=16, d_state=8), attention=dict(num_heads=2), lion=dict(num_heads=2))
ENCODER_PATTERNS = ["F", "N", "B", "G", "M", "A", "BGMA"]


def run_model_checks(rank: int, world_size: int, sp_size: int) -> None:
    """As test_sequence_model.py: the encoder under sp (its short convs take their halo, its recurrent layers both
    combines, attention every rank's keys) == the encoder on full rows, logits and every parameter's gradient."""
    groups = [dist.new_group(list(range(first, first + sp_size))) for first in range(0, world_size, sp_size)]
    group, sp_rank = groups[rank // sp_size], rank % sp_size
    for pattern in ENCODER_PATTERNS:
        torch.manual_seed(0)
        lm = LM.from_config(dict(TINY, pattern=pattern))
        tokens, starts = batch_layout(sp_size)
        T = tokens.shape[1]
        logits = lm(tokens, cu_seqlens=cu_seqlens_of(starts, T))
        weight = torch.randn_like(logits)
        (logits * weight).sum().backward()
        expected = {name: p.grad.clone() for name, p in lm.named_parameters()}
        lm.zero_grad()
        lo = sp_rank * LOCAL_LEN
        sp = SequenceParallel(group, cu_seqlens_of(starts, LOCAL_LEN, lo), torch.tensor([lo in row for row in starts]))
        local_logits = lm(tokens[:, lo:lo + LOCAL_LEN], cu_seqlens=sp.cu_seqlens, sp=sp)
        torch.testing.assert_close(local_logits, logits[:, lo:lo + LOCAL_LEN].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{pattern}: logits differ: {m}")
        (local_logits * weight[:, lo:lo + LOCAL_LEN]).sum().backward()
        for name, param in lm.named_parameters():
            dist.all_reduce(param.grad, group=group)
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{pattern}: d{name} differs: {m}")
    assert ROWS == tokens.shape[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sp_size", [2, 4])
def test_encoder_under_sequence_parallel_matches_full_rows(spawn, sp_size):
    """4 processes: two sp groups of 2, or one of 4."""
    spawn(run_model_checks, 4, sp_size)
