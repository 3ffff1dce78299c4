"""The one attention mask rule, and the forms of it the attention kernels take.

    visible(q, k) = key_pos <= q_pos  and  key_pos >= q_doc_start  and  (window is None or q_pos - key_pos < window)

Every case (training rows, packed documents, sequence-parallel slices, the decode cache) reduces to three
position tensors in the same row coordinates: query positions [Tq] (increasing), each query's document
start [B, Tq] and key positions [Tk] (increasing). From the rule come
- `attention_mask`: the dense boolean [B, 1, Tq, Tk] (the reference, and the mask of one query block);
- `query_blocks`: for each block of queries, the range of keys any of them can see (the CPU path attends
  block by block over only those keys, so its memory is O(T·block));
- `flex_block_mask`: FlexAttention's BlockMask (CUDA: fully masked blocks are skipped, a window costs
  O(T·window)).
"""
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

BLOCK_SIZE = 128  # queries per block on the CPU path, and FlexAttention's (query and key) block size


def visible(q_pos: torch.Tensor, q_doc_start: torch.Tensor, key_pos: torch.Tensor,
            window: Optional[int]) -> torch.Tensor:
    """The rule, elementwise over broadcastable position tensors (True = the query attends the key)."""
    allowed = (key_pos <= q_pos) & (key_pos >= q_doc_start)
    if window is not None:
        allowed = allowed & (q_pos - key_pos < window)
    return allowed


def attention_mask(q_pos: torch.Tensor, q_doc_start: torch.Tensor, key_pos: torch.Tensor,
                   window: Optional[int]) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk] (True = attend) from query positions [Tq], each query's document
    start [B, Tq] and key positions [Tk], all in the same (row) coordinates."""
    return visible(q_pos[None, :, None], q_doc_start[:, :, None], key_pos[None, None, :], window)[:, None]


def query_blocks(q_pos: torch.Tensor, q_doc_start: torch.Tensor, key_pos: torch.Tensor, window: Optional[int],
                 block_size: int = BLOCK_SIZE) -> list[tuple[slice, slice]]:
    """(query slice, key slice) per block of `block_size` queries: the keys from the earliest any query of
    the block (in any row) may see, max(doc start, q_pos - window + 1), to the block's last query."""
    num_queries = q_pos.numel()
    earliest = q_doc_start.amin(dim=0)
    if window is not None:
        earliest = torch.maximum(earliest, q_pos - window + 1)
    block = torch.arange(num_queries, device=q_pos.device) // block_size
    starts = torch.arange(0, num_queries, block_size, device=q_pos.device)
    first_key = earliest.new_full(starts.shape, torch.iinfo(earliest.dtype).max)
    first_key = first_key.scatter_reduce(0, block, earliest, "amin")
    last_key = q_pos[(starts + block_size).clamp(max=num_queries) - 1]
    key_start = torch.searchsorted(key_pos, first_key.to(key_pos.dtype))
    key_end = torch.searchsorted(key_pos, last_key.to(key_pos.dtype), right=True)
    return [(slice(q, q + block_size), slice(k0, k1))
            for q, k0, k1 in zip(starts.tolist(), key_start.tolist(), key_end.tolist())]


def flex_block_mask(q_pos: torch.Tensor, q_doc_start: torch.Tensor, key_pos: torch.Tensor, window: Optional[int],
                    build=create_block_mask) -> BlockMask:
    """FlexAttention BlockMask [B, 1, Tq, Tk] of the rule. `build` is create_block_mask, or its compiled
    form on CUDA (the eager one evaluates the rule on a dense [B, 1, Tq, Tk] grid first)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_pos[q_idx], q_doc_start[b, q_idx], key_pos[kv_idx], window)

    return build(mask_mod, q_doc_start.shape[0], None, q_pos.numel(), key_pos.numel(), device=q_pos.device,
                 BLOCK_SIZE=BLOCK_SIZE)
