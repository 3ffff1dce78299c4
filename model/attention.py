"""Grouped-query attention with RoPE: full causal or sliding window, documents isolated.

Every case (training rows, packed documents, sequence-parallel slices, the decode cache) reduces to
the same three position tensors and one mask rule (model/attention_mask.py), so there is a single
attention code path. The mask is never dense over the whole sequence, so the memory kept for the
backward grows linearly with T:
- CUDA training: FlexAttention (compiled) with the rule's BlockMask, built once per batch and window
  and shared by every layer; fully masked blocks are skipped, a window costs O(T·window);
- CPU, and decoding: SDPA over blocks of queries, each against only the keys it can see, with that
  block's small mask; only q, k, v are saved and each block is recomputed in the backward.
"""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from kernels import rotate_rows
from model.attention_mask import attention_mask, flex_block_mask, query_blocks
from model.bidirectional import bidirectional_attention
from model.config import ModelConfig
from model.flops import attention_flops
from model.layers import RMSNorm, apply_rotary, rope_frequencies
from model.registry import Mixer, register


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


class QueryBlockAttention(torch.autograd.Function):
    """SDPA over blocks of queries, each against only the keys the block can see (query_blocks) under the
    block's own [B, 1, block, keys] mask. q [B, H, Tq, D]; k, v [B, H_kv, Tk, D]; positions as in
    model/attention_mask.py.

    Saves only q, k, v and the positions and recomputes each block in the backward, so what the backward
    holds is O(T) and what one block allocates O(block x keys); the price is computing attention twice."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, q_pos, q_doc_start, key_pos, window, blocks):
        ctx.blocks, ctx.window = blocks, window
        ctx.save_for_backward(q, k, v, q_pos, q_doc_start, key_pos)
        positions = (q_pos, q_doc_start, key_pos, window)
        return torch.cat([_attend_block(q[:, :, queries], k[:, :, keys], v[:, :, keys], positions, queries, keys)
                          for queries, keys in ctx.blocks], dim=2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_o):
        q, k, v, *positions = ctx.saved_tensors
        positions = (*positions, ctx.window)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        for queries, keys in ctx.blocks:
            parts = [x.detach().requires_grad_() for x in (q[:, :, queries], k[:, :, keys], v[:, :, keys])]
            with torch.enable_grad():
                o = _attend_block(*parts, positions, queries, keys)
            part_grads = torch.autograd.grad(o, parts, grad_o[:, :, queries])
            for grad, part_grad, rows in zip(grads, part_grads, (queries, keys, keys)):
                grad[:, :, rows] += part_grad
        return *grads, None, None, None, None, None


def _attend_block(q, k, v, positions, queries: slice, keys: slice) -> torch.Tensor:
    """SDPA of one block: q its queries, k and v its keys (the `queries` and `keys` rows of positions)."""
    q_pos, q_doc_start, key_pos, window = positions
    mask = attention_mask(q_pos[queries], q_doc_start[:, queries], key_pos[keys], window)
    # Expanding K/V keeps SDPA on its masked fused kernel (enable_gqa with a mask takes the math one).
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


FLEX_DEVICE_TYPES = {"cuda"}  # FlexAttention has no CPU backward: CPU takes the query-block path


@functools.cache
def _compiled_flex():
    """flex_attention and create_block_mask compiled once (the uncompiled ones materialise dense scores
    and a dense mask)."""
    return torch.compile(flex_attention), torch.compile(create_block_mask)


_shared_masks: dict = {}  # (kind, window) -> (layout, mask) of the batch the layers saw last


def shared_mask(kind: str, layout: tuple, q_pos, q_doc_start, key_pos, window: Optional[int]):
    """This batch's mask of one kind, built by its first attention layer of this window and reused by the
    others: 'flex', FlexAttention's BlockMask (CUDA); 'blocks', the query blocks and their key ranges (the
    CPU path, read on the host once per batch). layout = (the batch's cu_seqlens or sp object, or None, then
    the shapes): the same object with the same shapes means the same positions (batches bring new cu_seqlens
    tensors; none is changed in place)."""
    cached = _shared_masks.get((kind, window))
    if cached is None or cached[0][0] is not layout[0] or cached[0][1:] != layout[1:]:
        if kind == "flex":
            mask = flex_block_mask(q_pos, q_doc_start, key_pos, window, build=_compiled_flex()[1])
        else:
            mask = query_blocks(q_pos, q_doc_start, key_pos, window)
        _shared_masks[(kind, window)] = cached = (layout, mask)
    return cached[1]


class Attention(nn.Module):
    """Causal GQA; `window` None is full attention, an int a sliding window (the W letter)."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        a = cfg.attention
        self.num_heads = a.num_heads
        self.num_kv_heads = a.num_kv_heads or a.num_heads
        self.head_dim = a.head_dim or cfg.d_model // a.num_heads
        self.rope_theta, self.rope_scaling = a.rope_theta, a.rope_scaling
        self.window = window
        self.causal = not cfg.is_encoder  # an encoder's attention sees its whole document (model/bidirectional.py)
        self.q_proj = nn.Linear(cfg.d_model, self.num_heads * self.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.d_model, bias=a.out_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if a.qk_norm else None

    def _norm_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's query and key RMS-normed (qk_norm), else as they are."""
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        return rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling, device)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self._norm_heads(q, k)
        return self.o_proj(self._attend(q, k, v, cu_seqlens, sp, cache))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor], sp,
                cache: Optional[dict]) -> torch.Tensor:
        """Attention of the heads' queries q [B, T, H, D] over keys and values k, v [B, T, H_kv, D] (normed, not yet
        rotated), within self.window: o [B, T, H * D], before o_proj."""
        B, T = q.shape[:2]
        device = q.device
        if sp is not None:
            q_pos, q_doc_start = sp.positions(), sp.doc_start()
        elif cache is not None:  # a prefill: these rows hold cache["start"] tokens already
            q_pos = cache["start"] + torch.arange(T, device=device)
            q_doc_start = torch.zeros(B, T, dtype=torch.long, device=device)
        else:
            q_pos = torch.arange(T, device=device)
            q_doc_start = document_starts(cu_seqlens, B, T, device)
        inv_freq = self.inv_freq(device)
        q, k = apply_rotary(q, q_pos, inv_freq), apply_rotary(k, q_pos, inv_freq)
        if not self.causal:
            return bidirectional_attention(q, k, v, cu_seqlens, sp).reshape(B, T, -1)

        if sp is not None:
            k, v, key_pos = sp.gather_kv(k, v, self.window)
        elif cache is not None:
            k, v, key_pos = self._extend_cache(cache, k, v, q_pos)
        else:
            key_pos = q_pos

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        layout = (cu_seqlens if sp is None else sp, B, T, key_pos.numel(), device)
        if device.type in FLEX_DEVICE_TYPES and cache is None:
            block_mask = shared_mask("flex", layout, q_pos, q_doc_start, key_pos, self.window)
            o = _compiled_flex()[0](q, k, v, block_mask=block_mask, enable_gqa=True)
        else:
            blocks = (query_blocks(q_pos, q_doc_start, key_pos, self.window) if cache is not None  # decode: new keys
                      else shared_mask("blocks", layout, q_pos, q_doc_start, key_pos, self.window))
            o = QueryBlockAttention.apply(q, k, v, q_pos, q_doc_start, key_pos, self.window, blocks)
        return o.transpose(1, 2).reshape(B, T, -1)

    def _extend_cache(self, cache: dict, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
        """A prefill: write this call's keys into the preallocated cache (slot = position, or position mod
        the window for a sliding-window layer's ring) and return all keys this call attends to, in k's dtype
        (the cache's is the weights', k's the autocast one)."""
        start, T = cache["start"], k.shape[1]
        slots = cache["k"].shape[1]
        if self.window is None:
            cache["k"][:, start:start + T], cache["v"][:, start:start + T] = k, v
            keys = torch.arange(start + T, device=k.device)
            return cache["k"][:, :start + T].to(k.dtype), cache["v"][:, :start + T].to(v.dtype), keys
        # The earlier keys a window still sees, in position order, then this call's keys.
        earlier = torch.arange(max(0, start - self.window + 1), start, device=k.device)
        all_k = torch.cat((cache["k"][:, earlier % slots].to(k.dtype), k), 1)
        all_v = torch.cat((cache["v"][:, earlier % slots].to(v.dtype), v), 1)
        kept = q_pos[-slots:]  # a ring of `slots` keeps the last ones
        cache["k"][:, kept % slots] = k[:, -slots:].to(cache["k"].dtype)
        cache["v"][:, kept % slots] = v[:, -slots:].to(cache["v"].dtype)
        return all_k, all_v, torch.cat((earlier, q_pos))

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row, x [B, d_model] at row positions [B] (a tensor: rows may differ): write its key and
        value in place at their slot, attend over the whole preallocated cache with the slots past each row's
        position masked, so the work and the operations do not depend on the context (no host sync, no copy)."""
        qk = self._decode_qk(x)
        return self.o_proj(self._decode_attend(qk, self.v_proj(x), cache, positions).to(x.dtype))

    def _decode_qk(self, x: torch.Tensor) -> torch.Tensor:
        """The decode step's queries and keys [B, H + H_kv, D] (one matmul each, normed, not yet rotated)."""
        qk = torch.cat((self.q_proj(x), self.k_proj(x)), -1).view(x.shape[0], -1, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat(self._norm_heads(*qk.split((self.num_heads, self.num_kv_heads), 1)), 1)
        return qk

    def _decode_attend(self, qk: torch.Tensor, v: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """Rotate the step's queries and keys qk [B, H + H_kv, D], write the key and value v [B, H_kv * D] at their
        slot and attend over the cache: o [B, H * D] in the cache's dtype. Grouped heads: the G query heads of a
        KV head are G queries against it (no K/V expansion)."""
        B = qk.shape[0]
        G, D = self.num_heads // self.num_kv_heads, self.head_dim
        constants = cache["constants"]
        qk = rotate_rows(qk, positions, constants["inv_freq"])
        q, k = qk.split((self.num_heads, self.num_kv_heads), 1)
        slot = positions if self.window is None else positions % cache["k"].shape[1]
        cache["k"].index_put_((constants["rows"], slot), k.to(cache["k"].dtype))
        cache["v"].index_put_((constants["rows"], slot), v.view(B, -1, D).to(cache["v"].dtype))
        # Slot s holds a key of this row once written: s <= position (a window's ring is full from then on).
        mask = (constants["slot_ids"] <= positions[:, None]).view(B, 1, 1, -1)
        o = F.scaled_dot_product_attention(q.reshape(B, self.num_kv_heads, G, D).to(cache["k"].dtype),
                                           cache["k"].transpose(1, 2), cache["v"].transpose(1, 2), attn_mask=mask)
        return o.reshape(B, -1)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """K and V [B, slots, H_kv, D], slots = max_len (a window: min(window, max_len), used as a ring), and
        the decode step's constants (not per row)."""
        w = self.k_proj.weight
        slots = max_len if self.window is None else min(self.window, max_len)
        inv_freq = self.inv_freq(w.device)
        # Under autocast the keys are computed (and attended) in its dtype: caching them in it halves the cache
        # and spares a cast of the whole cache every step.
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        # torch.zeros, not w.new_zeros: under FSDP2 the weight is a DTensor, the cache a plain local tensor.
        return {"k": torch.zeros(shape, dtype=dtype, device=w.device),
                "v": torch.zeros(shape, dtype=dtype, device=w.device),
                "constants": {"slot_ids": torch.arange(slots, device=w.device),
                              "rows": torch.arange(batch_size, device=w.device),
                              "inv_freq": torch.cat((inv_freq, inv_freq))}}


register(Mixer("attention", "A", config_key="attention", build=Attention, flops=attention_flops,
               bidirectional="optional"))
register(Mixer("sliding_window", "W", config_key="attention", flops=attention_flops,
               build=lambda cfg: Attention(cfg, window=cfg.attention.window)))
