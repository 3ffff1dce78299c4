"""Encoders: layers that see the whole sequence (model.bidirectional; LION's mixers always).

- Recurrent layers with a diagonal decay (LION, GLA, Mamba2) run their GLA-family core both ways
  (`BidirectionalCore`, kernels/lion): the causal op forward, and on each sequence reversed with the backward
  decays, combined with the diagonal counted once; LION also divides each row by its sum (a [v | 1] column).
  `model.lion.form` picks the form: full (the masked attention matrix), chunk (linear, the default) or rnn (a
  constant state per direction). Under sequence parallelism every form runs the chunked ops: the forward
  direction by `sp.scan`'s prefix combine, the backward one by `sp.scan_reverse`'s suffix combine.
- Attention drops the causal mask (`bidirectional_attention`): SDPA over the keys of the query's own document;
  under sequence parallelism over every rank's keys (`sp.gather_all_kv`).

The delta-rule family (Gated DeltaNet, DeltaNet, Gated DeltaProduct) has no such form: its transition
I - beta k k^T is not a diagonal decay, so the state the backward direction needs at token i, summing the later
tokens through the later transitions in reverse order, is not the reversed sequence's prefix under the same
recurrence with shifted gates; nor do RG-LRU, ParaRNN or the mLSTM (nonlinear or stabilised recurrences).
An encoder has no decoding: init_state, generation and the causal evaluation tasks refuse it.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.backend import use_triton
from kernels.lion import combine_directions, lion, with_normalizer, zero_gate
from model.registry import RecurrentCore

EPS = 1e-6  # added to a normalised row's sum (positive by construction: LION's feature maps are positive)


@dataclass(frozen=True)
class BidirectionalCore:
    """A recurrent core with GLA's diagonal gate (chunk_gla and its state summary) run both ways."""
    base: RecurrentCore
    form: str = "chunk"
    normalize: bool = False  # LION: y / (row sum); bidirectional GLA / Mamba2: y
    chunk_vjp: Optional[Callable] = None  # plain autograd (model/recurrent.py mix: no recomputation around it)
    recompute: bool = True  # the chunk form on the PyTorch path keeps only its inputs (False: the caller does)
    directions: int = 2  # FLOPs: twice the causal recurrence

    @property
    def kernel(self) -> str:
        return self.base.kernel

    def scan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
             cu_seqlens: Optional[torch.Tensor], sp, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        """o [B, T, H, V] of q, k [B, T, H, K], v [B, T, H, V] and the log decay g ([B, T, H, K], [B, T, H] or
        None: none), each row or document of cu_seqlens (over the flattened rows) on its own."""
        g = zero_gate(q) if g is None else g
        if sp is not None:
            values = with_normalizer(v) if self.normalize else v
            forward = sp.scan(self.base, q, k, values, scale=scale, g=g)
            backward = sp.scan_reverse(self.base, q, k, values, scale=scale, g=g)
            return combine_directions(forward, backward, q, k, values, scale, self.normalize, EPS)
        tensors = (q, k, v, g)
        if cu_seqlens is not None:
            tensors = [x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]) for x in tensors]
        op = partial(lion, scale=scale, cu_seqlens=cu_seqlens, normalize=self.normalize, eps=EPS, form=self.form)
        if self.recompute and self.form == "chunk" and torch.is_grad_enabled() and not use_triton(q):
            # The chunked PyTorch path would keep its intra-chunk matrices and chunk states for the backward (several
            # times q, k, v): keep only its inputs and run it again in the backward, as attention's CPU path does.
            # The Triton op keeps only its inputs anyway.
            return checkpoint(op, *tensors, use_reentrant=False).view(v.shape)
        return op(*tensors).view(v.shape)


def encoder_only(what: str) -> None:
    """The one-line refusal of what needs a causal model."""
    from configs.errors import ConfigError

    raise ConfigError(f"{what}: the model is an encoder (bidirectional: LION or model.bidirectional=true), "
                      "which has no decoding and no causal tasks")


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                            sp) -> torch.Tensor:
    """SDPA without the causal mask, each query over the keys of its own document. q [B, T, H, D], k, v
    [B, T, H_kv, D] (rotary applied) -> [B, T, H, D]. Without documents (no cu_seqlens, one process) no mask."""
    B, T = q.shape[:2]
    mask = None
    if sp is not None:
        k, v, key_start = sp.gather_all_kv(k, v)
        mask = (sp.doc_start()[:, :, None] == key_start[:, None, :])[:, None]
    elif cu_seqlens is not None:  # each token's document by its first token (over the flattened rows)
        bounds = cu_seqlens.to(device=q.device, dtype=torch.long)
        start = bounds[torch.searchsorted(bounds, torch.arange(B * T, device=q.device), right=True) - 1].view(B, T)
        mask = (start[:, :, None] == start[:, None, :])[:, None]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)
