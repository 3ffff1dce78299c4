"""Grouped-query attention with RoPE: full causal or sliding window, documents isolated.

Every case (training rows, packed documents, sequence-parallel slices, the decode cache) reduces to
the same three position tensors and one mask function, so there is a single attention code path:
    mask = key_pos <= q_pos  and  key_pos >= q_doc_start  and  (window is None or q_pos - key_pos < window)
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import apply_rotary


def attention_mask(q_pos: torch.Tensor, q_doc_start: torch.Tensor, key_pos: torch.Tensor,
                   window: Optional[int]) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk] (True = attend) from query positions [Tq], each query's document
    start [B, Tq] and key positions [Tk], all in the same (row) coordinates."""
    q, k = q_pos[:, None], key_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None] & (k[None] >= q_doc_start[:, :, None])
    return allowed[:, None]


def document_starts(cu_seqlens: Optional[torch.Tensor], batch: int, seq_len: int,
                    device: torch.device) -> torch.Tensor:
    """Row position [B, T] where each token's document begins (0 without cu_seqlens).

    cu_seqlens runs over the flattened B*T tokens and contains every row start, so the document
    start of flat token i is the last boundary <= i, taken relative to its row.
    """
    if cu_seqlens is None:
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    flat = torch.arange(batch * seq_len, device=device, dtype=cu_seqlens.dtype)
    start = cu_seqlens[torch.searchsorted(cu_seqlens, flat, right=True) - 1]
    return (start - (flat // seq_len) * seq_len).long().view(batch, seq_len)


class Attention(nn.Module):
    """Causal GQA; `window` None is full attention, an int a sliding window (the W letter)."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        a = cfg.attention
        self.num_heads = a.num_heads
        self.num_kv_heads = a.num_kv_heads or a.num_heads
        self.head_dim = a.head_dim or cfg.d_model // a.num_heads
        self.rope_theta = a.rope_theta
        self.window = window
        self.q_proj = nn.Linear(cfg.d_model, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)

        if sp is not None:
            q_pos, q_doc_start = sp.positions(), sp.doc_start()
        elif cache is not None:  # generation: each row is one document that started at position 0
            q_pos = cache["pos"] + torch.arange(T, device=x.device)
            q_doc_start = torch.zeros(B, T, dtype=torch.long, device=x.device)
        else:
            q_pos = torch.arange(T, device=x.device)
            q_doc_start = document_starts(cu_seqlens, B, T, x.device)
        q = apply_rotary(q, q_pos, self.rope_theta)
        k = apply_rotary(k, q_pos, self.rope_theta)

        if sp is not None:
            k, v, key_pos = sp.gather_kv(k, v, self.window)
        elif cache is not None:
            k, v, key_pos = self._extend_cache(cache, k, v, q_pos)
        else:
            key_pos = q_pos

        mask = attention_mask(q_pos, q_doc_start, key_pos, self.window)
        groups = self.num_heads // self.num_kv_heads
        # Expanding K/V keeps SDPA on its masked memory-efficient kernel (enable_gqa with a mask falls
        # back to the math kernel on CUDA).
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _extend_cache(self, cache: dict, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
        """Append this call's keys to the cache; return all keys this call attends to. The cache keeps
        only the last `window` keys of a sliding-window layer: later queries never see older ones."""
        if cache["k"] is not None:
            k, v = torch.cat((cache["k"], k), dim=1), torch.cat((cache["v"], v), dim=1)
            key_pos = torch.cat((cache["key_pos"], q_pos))
        else:
            key_pos = q_pos
        keep = slice(None) if self.window is None else slice(-self.window, None)
        cache["k"], cache["v"], cache["key_pos"] = k[:, keep], v[:, keep], key_pos[keep]
        cache["pos"] += q_pos.numel()
        return k, v, key_pos

    def init_cache(self, batch_size: int) -> dict:
        return {"k": None, "v": None, "key_pos": None, "pos": 0}
