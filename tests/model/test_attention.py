"""Attention in memory linear in T: the query-block path (CPU, decoding) and FlexAttention's block mask
(CUDA) against SDPA with the dense mask of the same rule, and the growth of what the backward keeps."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from model import attention
from model.attention import QueryBlockAttention
from model.attention_mask import BLOCK_SIZE, attention_mask, flex_block_mask, query_blocks
from model.config import AttentionConfig
from model.memory import packed_documents, saved_bytes

VOCAB = 97  # tests/model/conftest.py's small models
CUDA = torch.cuda.is_available()
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
# (queries, keys before the first query, document starts of row 0 and row 1 relative to the first query):
# several blocks with an odd tail; queries that do not start at key 0 (a sequence-parallel slice with
# its halo, a decode cache); a document that began before the first query.
LAYOUTS = [(300, 0, [0, 5, 130, 257], [0, 299]), (131, 20, [-20, 60], [-7, 1, 128]), (77, 0, [0], [0])]
WINDOWS = [None, 1, 3, 129, 1000]


def positions(num_queries: int, num_past_keys: int, *row_starts: list[int]):
    """q_pos, q_doc_start [rows, Tq], key_pos: queries from num_past_keys on, keys from 0; each row's
    document starts given relative to the first query."""
    offset = num_past_keys
    q_pos = torch.arange(offset, offset + num_queries)
    starts = []
    for row in row_starts:
        boundaries = torch.tensor(row) + offset
        starts.append(boundaries[torch.searchsorted(boundaries, q_pos, right=True) - 1])
    return q_pos, torch.stack(starts), torch.arange(offset + num_queries)


def qkv(num_queries: int, num_keys: int):
    gen = torch.Generator().manual_seed(num_queries + num_keys)
    shapes = [(2, HEADS, num_queries, HEAD_DIM)] + [(2, KV_HEADS, num_keys, HEAD_DIM)] * 2
    return [torch.randn(*shape, generator=gen).requires_grad_() for shape in shapes]


def dense_reference(q, k, v, q_pos, q_doc_start, key_pos, window):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=attention_mask(q_pos, q_doc_start, key_pos, window))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_query_blocks_match_the_dense_mask(layout, window):
    q_pos, q_doc_start, key_pos = positions(*layout)
    inputs = qkv(q_pos.numel(), key_pos.numel())
    reference = [x.detach().clone().requires_grad_() for x in inputs]
    blocks = query_blocks(q_pos, q_doc_start, key_pos, window)
    o = QueryBlockAttention.apply(*inputs, q_pos, q_doc_start, key_pos, window, blocks)
    o_ref = dense_reference(*reference, q_pos, q_doc_start, key_pos, window)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    grad_o = torch.randn_like(o)
    o.backward(grad_o)
    o_ref.backward(grad_o)
    for name, x, x_ref in zip("qkv", inputs, reference):
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_query_blocks_attend_only_to_visible_keys():
    """A window costs O(T·window): each block's key slice is at most block + window - 1 keys, starts at
    the block's first visible key and ends at its last query; a document start cuts it."""
    q_pos, q_doc_start, key_pos = positions(1000, 0, [0], [0])
    for queries, keys in query_blocks(q_pos, q_doc_start, key_pos, window=3):
        assert (keys.start, keys.stop) == (max(0, queries.start - 2), min(queries.stop, 1000))
    q_pos, q_doc_start, key_pos = positions(300, 0, [0, 200], [0, 150])
    assert [(k.start, k.stop) for _, k in query_blocks(q_pos, q_doc_start, key_pos, None)] == [
        (0, 128), (0, 256), (150, 300)]


@pytest.mark.parametrize("window", [None, 1, 129])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_block_mask_matches_the_dense_mask(layout, window):
    """FlexAttention's forward (uncompiled, which runs on CPU) under the rule's BlockMask."""
    q_pos, q_doc_start, key_pos = positions(*layout)
    q, k, v = (x.detach() for x in qkv(q_pos.numel(), key_pos.numel()))
    block_mask = flex_block_mask(q_pos, q_doc_start, key_pos, window)
    o = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(o, dense_reference(q, k, v, q_pos, q_doc_start, key_pos, window),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3, 200])
def test_flex_skips_the_blocks_the_query_blocks_skip(window):
    """Both forms of the rule visit the same key blocks: FlexAttention's non-empty ones are those the
    CPU path's key slice of each query block covers."""
    q_pos, q_doc_start, key_pos = positions(1000, 0, [0, 300, 700])
    block_mask = flex_block_mask(q_pos, q_doc_start, key_pos, window)
    visited = block_mask.to_dense()[0, 0].bool()  # [query blocks, key blocks]
    for row, (_, keys) in enumerate(query_blocks(q_pos, q_doc_start, key_pos, window)):
        expected = torch.zeros_like(visited[row])
        expected[keys.start // BLOCK_SIZE:(keys.stop - 1) // BLOCK_SIZE + 1] = True
        assert torch.equal(visited[row], expected), f"query block {row}"
    assert visited.sum() < visited.numel() / 2  # documents (and a window) leave blocks out


@pytest.mark.parametrize("pattern, documents", [("A", 1), ("W", 1), ("GA", 1), ("AW", 3)])
def test_saved_memory_grows_linearly(make_lm, pattern, documents):
    """x4 tokens -> at most x4.5 bytes kept for the backward (the dense mask made it x9.3 for A)."""
    lm = make_lm(pattern, d_model=32, d_ff=64)
    sizes = []
    for seq_len in (512, 2048):
        ids = torch.randint(0, VOCAB, (1, seq_len))
        sizes.append(saved_bytes(lm, ids, packed_documents(seq_len, documents)))
    assert sizes[1] <= 4.5 * sizes[0], f"{pattern}: {sizes[0]} -> {sizes[1]} bytes for x4 tokens"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="FlexAttention's compiled kernel and backward need a CUDA GPU")
@pytest.mark.parametrize("pattern", ["A", "W"])
def test_flex_attention_on_cuda_matches_the_query_block_path(make_lm, pattern):
    """The CUDA path (compiled FlexAttention, shared BlockMask) against the CPU path: logits and
    gradients of a two-row batch of packed documents."""
    lm = make_lm(pattern, attention=AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, window=100))
    ids = torch.randint(0, VOCAB, (2, 300))
    cu_seqlens = torch.tensor([0, 7, 200, 300, 301, 600], dtype=torch.int32)
    results = []
    for device in ("cpu", "cuda"):
        lm.zero_grad()
        lm.to(device)
        logits = lm(ids.to(device), cu_seqlens=cu_seqlens.to(device))
        logits.square().mean().backward()
        results.append((logits.cpu(), [p.grad.cpu() for p in lm.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    for grad_cuda, grad_cpu in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(grad_cuda, grad_cpu, atol=1e-4, rtol=1e-3)


def test_model_flex_branch_shares_one_block_mask_per_batch_and_window(make_lm, monkeypatch):
    """The model's FlexAttention branch, run by FlexAttention's uncompiled forward on CPU, gives the
    query-block path's logits, and builds one BlockMask per batch and window for all its layers."""
    lm = make_lm("AWAW")
    builds = []

    def counting_create_block_mask(*args, **kwargs):
        builds.append(args[3:5])  # (Q_LEN, KV_LEN)
        return create_block_mask(*args, **kwargs)

    ids = torch.randint(0, VOCAB, (2, 150))
    cu_seqlens = torch.tensor([0, 40, 150, 151, 300], dtype=torch.int32)
    with torch.no_grad():
        expected = lm(ids, cu_seqlens=cu_seqlens)
        monkeypatch.setattr(attention, "FLEX_DEVICE_TYPES", {"cpu"})
        monkeypatch.setattr(attention, "_compiled_flex", lambda: (flex_attention, counting_create_block_mask))
        torch.testing.assert_close(lm(ids, cu_seqlens=cu_seqlens), expected, atol=1e-5, rtol=1e-4)
        assert builds == [(150, 150)] * 2  # one for the A layers, one for the W layers
        lm(ids, cu_seqlens=cu_seqlens.clone())  # a new batch
        assert len(builds) == 4


def test_prefill_builds_only_per_block_masks_and_decode_none(make_lm, monkeypatch):
    """Generation never builds a [T, T] mask: a prefill attends block by block (a W layer to at most
    block + window - 1 keys); a decode step masks the preallocated cache by each row's length, without the
    query-block machinery."""
    lm = make_lm("AW")
    window = lm.config.attention.window
    shapes = []

    def recording_mask(*args):
        mask = attention_mask(*args)
        shapes.append((args[3], mask.shape[-2:]))
        return mask

    monkeypatch.setattr(attention, "attention_mask", recording_mask)
    with torch.no_grad():
        state = lm.init_state(2, max_len=301)
        lm.step(torch.randint(0, VOCAB, (2, 300)), state)
        lm.step(torch.randint(0, VOCAB, (2,)), state)
    full = [shape for layer_window, shape in shapes if layer_window is None]
    windowed = [shape for layer_window, shape in shapes if layer_window == window]
    assert full == [(128, 128), (128, 256), (44, 300)]
    assert windowed == [(128, 128), (128, 128 + window - 1), (44, 44 + window - 1)]
