"""Sequence-parallel ops on 2 and 4 gloo processes equal the single-process ops, forward and backward.

Each rank holds a slice of the same full rows; the reference is the op on the full rows with the documents'
cu_seqlens, run on every rank. Documents cross rank boundaries, one starts exactly at a boundary, one spans
more than two ranks, and some slices are shorter than the conv halo or the attention window.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import causal_conv1d
from model.attention import attention_mask, document_starts
from model.registry import MIXERS
from parallel.sequence import SequenceParallel

BATCH, HEADS, KEY_DIM, VALUE_DIM = 3, 2, 8, 6


def document_layout(world_size: int, local_len: int) -> list[list[int]]:
    """Document start positions of each full row (row length world_size * local_len)."""
    T = world_size * local_len
    rows = [
        {0, local_len, local_len + 2, T - 3},  # a start on a rank boundary, short and long documents
        {0, 3, local_len - 1, T - 1},  # a document over several ranks, a one-token one at the end
        {0},  # one document over every rank: the transitions chain through all of them
    ]
    return [sorted(s for s in starts if s < T) for starts in rows]


def full_cu_seqlens(doc_starts: list[list[int]], T: int) -> torch.Tensor:
    bounds = sorted({b * T + s for b, starts in enumerate(doc_starts) for s in starts} | {len(doc_starts) * T})
    return torch.tensor(bounds, dtype=torch.int32)


def local_batch(doc_starts: list[list[int]], rank: int, local_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens over the local B*T tokens, starts_document [B]) of rank's slice, as the loader builds them."""
    lo, hi = rank * local_len, (rank + 1) * local_len
    bounds, starts_document = {BATCH * local_len}, []
    for b, starts in enumerate(doc_starts):
        bounds.add(b * local_len)
        bounds.update(b * local_len + s - lo for s in starts if lo <= s < hi)
        starts_document.append(lo in starts)
    return torch.tensor(sorted(bounds), dtype=torch.int32), torch.tensor(starts_document)


def local_slice(x: torch.Tensor, rank: int, local_len: int) -> torch.Tensor:
    """A fresh leaf holding rank's slice of x [B, T, ...]."""
    return x.detach()[:, rank * local_len : (rank + 1) * local_len].clone().requires_grad_()


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1, *x.shape[2:])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def check_scan(sp, mixer: str, inputs: dict, doc_starts, rank: int, local_len: int, flat_input: bool) -> None:
    """sp.scan with the mixer's recurrent core on the slices == its chunked op on the full rows with cu_seqlens:
    outputs and input gradients."""
    core = MIXERS[mixer].core
    T = local_len * sp.size
    cu = full_cu_seqlens(doc_starts, T)
    full = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    o_full, _ = core.chunk(**{name: flat(x) for name, x in full.items()}, cu_seqlens=cu)
    o_full = o_full.view(BATCH, T, HEADS, -1)
    weight = torch.randn_like(o_full)  # same on every rank: seeded identically
    (o_full * weight).sum().backward()

    local = {name: local_slice(x, rank, local_len) for name, x in inputs.items()}
    shaped = {name: flat(x) if flat_input else x for name, x in local.items()}
    q, k, v = shaped.pop("q"), shaped.pop("k"), shaped.pop("v")
    o = sp.scan(core, q, k, v, **shaped)
    assert o.shape == q.shape[:-1] + v.shape[-1:]
    o = o.view(BATCH, local_len, HEADS, -1)
    my_slice = slice(rank * local_len, (rank + 1) * local_len)
    assert_close(o, o_full[:, my_slice].detach(), f"{mixer} output")
    (o * weight[:, my_slice]).sum().backward()
    for name in inputs:
        if full[name].grad is None:  # an input the core ignores (the diagonal scan's q)
            assert local[name].grad is None, f"{mixer} d{name}"
            continue
        assert_close(local[name].grad, full[name].grad[:, my_slice], f"{mixer} d{name}")


def check_conv(sp, doc_starts, rank: int, local_len: int, width: int) -> None:
    """sp.conv == causal_conv1d over the full rows, including the gradients of x, weight and bias."""
    T, dim = local_len * sp.size, 5
    x, weight, bias = torch.randn(BATCH, T, dim), torch.randn(dim, width), torch.randn(dim)
    full = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_full, _ = causal_conv1d(flat(full[0]), full[1], full[2], "silu", cu_seqlens=full_cu_seqlens(doc_starts, T))
    y_full = y_full.view(BATCH, T, dim)
    out_weight = torch.randn_like(y_full)
    (y_full * out_weight).sum().backward()

    x_local, w_local, b_local = local_slice(x, rank, local_len), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sp.conv(x_local, w_local, b_local, "silu")
    my_slice = slice(rank * local_len, (rank + 1) * local_len)
    assert_close(y, y_full[:, my_slice].detach(), f"conv width {width} output")
    (y * out_weight[:, my_slice]).sum().backward()
    assert_close(x_local.grad, full[0].grad[:, my_slice], f"conv width {width} dx")
    for name, param, reference in (("weight", w_local, full[1]), ("bias", b_local, full[2])):
        dist.all_reduce(param.grad, group=sp.group)  # shared parameters: every rank holds a part of the grad
        assert_close(param.grad, reference.grad, f"conv width {width} d{name}")


def attend(q, k, v, q_pos, q_doc_start, key_pos, window):
    mask = attention_mask(q_pos, q_doc_start, key_pos, window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def check_attention(sp, doc_starts, rank: int, local_len: int, window) -> None:
    """Attention over sp.gather_kv's keys with sp's positions == attention over the full rows."""
    T, head_dim = local_len * sp.size, 4
    q, k, v = (torch.randn(BATCH, T, HEADS, head_dim) for _ in range(3))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    positions = torch.arange(T)
    o_full = attend(*full, positions, document_starts(full_cu_seqlens(doc_starts, T), BATCH, T, q.device), positions, window)
    out_weight = torch.randn_like(o_full)
    (o_full * out_weight).sum().backward()

    local = [local_slice(t, rank, local_len) for t in (q, k, v)]
    k_all, v_all, key_pos = sp.gather_kv(local[1], local[2], window)
    o = attend(local[0], k_all, v_all, sp.positions(), sp.doc_start(), key_pos, window)
    my_slice = slice(rank * local_len, (rank + 1) * local_len)
    assert_close(o, o_full[:, my_slice].detach(), f"attention window={window} output")
    (o * out_weight[:, my_slice]).sum().backward()
    for name, leaf, reference in zip("qkv", local, full):
        assert_close(leaf.grad, reference.grad[:, my_slice], f"attention window={window} d{name}")


def run_checks(rank: int, world_size: int) -> None:
    for local_len in (7, 2):  # odd slices, and slices shorter than the conv halo / attention window
        doc_starts = document_layout(world_size, local_len)
        cu, starts_document = local_batch(doc_starts, rank, local_len)
        sp = SequenceParallel(dist.group.WORLD, cu, starts_document)
        torch.manual_seed(local_len)  # identical full inputs on every rank
        T = world_size * local_len
        qkv = lambda: dict(q=torch.randn(BATCH, T, HEADS, KEY_DIM), k=torch.randn(BATCH, T, HEADS, KEY_DIM) / KEY_DIM**0.5,
                           v=torch.randn(BATCH, T, HEADS, VALUE_DIM))
        gla_vector = dict(qkv(), g=F.logsigmoid(torch.randn(BATCH, T, HEADS, KEY_DIM)) / 4)
        mamba2_scalar = dict(qkv(), g=-F.softplus(torch.randn(BATCH, T, HEADS)))
        delta = dict(qkv(), g=F.logsigmoid(torch.randn(BATCH, T, HEADS)),
                     beta=torch.rand(BATCH, T, HEADS))
        delta["k"] = F.normalize(delta["k"], dim=-1)
        # The diagonal scan (RG-LRU's core) with a signed a: h = a h + k v elementwise, o = h.
        scan = dict(qkv(), a=2 * torch.rand(BATCH, T, HEADS, KEY_DIM) - 1)
        scan["v"] = torch.randn(BATCH, T, HEADS, KEY_DIM)
        # DeltaNet: no decay (g = 0), beta in (0, 2) (negative eigenvalues).
        ungated = dict(delta, g=torch.zeros(BATCH, T, HEADS), beta=2 * torch.rand(BATCH, T, HEADS))
        # Gated DeltaProduct: three Householder steps per token, each with its own key, value and beta.
        product = dict(q=torch.randn(BATCH, T, HEADS, KEY_DIM),
                       k=F.normalize(torch.randn(BATCH, T, 3, HEADS, KEY_DIM), dim=-1),
                       v=torch.randn(BATCH, T, 3, HEADS, VALUE_DIM), g=F.logsigmoid(torch.randn(BATCH, T, HEADS)),
                       beta=2 * torch.rand(BATCH, T, 3, HEADS))
        # The mLSTM: exponential input gates of e^(+-6) (the stabiliser at work), sigmoid forget gates.
        mlstm = dict(qkv(), i=2 * torch.randn(BATCH, T, HEADS), f=F.logsigmoid(torch.randn(BATCH, T, HEADS) + 1))
        check_scan(sp, "gla", gla_vector, doc_starts, rank, local_len, flat_input=False)
        check_scan(sp, "mamba2", mamba2_scalar, doc_starts, rank, local_len, flat_input=True)
        check_scan(sp, "gated_deltanet", delta, doc_starts, rank, local_len, flat_input=False)
        check_scan(sp, "deltanet", ungated, doc_starts, rank, local_len, flat_input=True)
        check_scan(sp, "gated_deltaproduct", product, doc_starts, rank, local_len, flat_input=False)
        check_scan(sp, "rglru", scan, doc_starts, rank, local_len, flat_input=True)
        check_scan(sp, "mlstm", mlstm, doc_starts, rank, local_len, flat_input=False)
        for width in (2, 4):
            check_conv(sp, doc_starts, rank, local_len, width)
        for window in (None, 1, 3, 2 * local_len + 1):
            check_attention(sp, doc_starts, rank, local_len, window)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_ops_match_single_process(spawn, world_size):
    spawn(run_checks, world_size)
