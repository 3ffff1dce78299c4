"""Gated Linear Attention (Yang et al. 2023): S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

The decay a_t = exp(g_t) comes from a low-rank projection through logsigmoid divided by a normaliser
(16 in the paper), which keeps the per-step decays close to 1 so the state remembers long enough.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import chunk_gla, chunk_gla_vjp, fused_recurrent_gla, gla_state_summary
from model.config import ModelConfig
from model.layers import GatedRMSNorm, RMSNorm
from model.bidirectional import BidirectionalCore
from model.flops import chunked_recurrence_flops
from model.recurrent import (ShortConvolution, fused_conv_cache, fused_conv_decode, mix, output_gate,
                             recurrent_step)
from model.registry import Mixer, RecurrentCore, register

# A [K] log decay per head and step (the vector gate).
GLA_CORE = RecurrentCore("gla", chunk=chunk_gla, chunk_vjp=chunk_gla_vjp, decode=fused_recurrent_gla,
                          state_summary=gla_state_summary)


class GLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.gla
        d = cfg.d_model
        self.num_heads = g.num_heads
        self.key_dim, self.value_dim = int(d * g.expand_k), int(d * g.expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // g.num_heads, self.value_dim // g.num_heads
        self.gate_logit_normalizer = g.gate_logit_normalizer
        self.core = BidirectionalCore(GLA_CORE, cfg.lion.form) if cfg.is_encoder else GLA_CORE

        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d, g.gate_low_rank_dim, bias=False),
                                     nn.Linear(g.gate_low_rank_dim, self.key_dim, bias=True))
        self.convs = None
        if g.use_short_conv:
            self.convs = nn.ModuleDict({
                name: ShortConvolution(dim, g.conv_size, cache_key=f"{name}_conv")
                for name, dim in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))})
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if g.use_output_gate else None
        self.g_norm = (GatedRMSNorm(self.head_v_dim, cfg.norm_eps) if g.use_output_gate
                       else RMSNorm(self.head_v_dim, cfg.norm_eps))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        low_rank, gate_out = self.gk_proj
        tensors = dict(q=self.q_proj(x), k=self.k_proj(x), v=self.v_proj(x), gk=low_rank(x),
                       gk_weight=gate_out.weight, gk_bias=gate_out.bias, norm=self.g_norm.weight)
        if self.g_proj is not None:
            tensors.update(x=x, gate_weight=self.g_proj.weight)
        if self.convs is not None:
            tensors.update({f"{name}_conv": conv.weight for name, conv in self.convs.items()})
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj,
                   scale=self.head_k_dim ** -0.5, cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The projections (and the parameters in t) -> q, k, v [B, T, H, *] and the log decay g."""
        q, k, v = t["q"], t["k"], t["v"]
        if self.convs is not None:
            q, k, v = (self.convs[name](t[name], cu_seqlens, sp, cache, weight=t[f"{name}_conv"]) for name in "qkv")
        B, T, H, K = *q.shape[:2], self.num_heads, self.head_k_dim
        g = self._log_decay(F.linear(t["gk"], t["gk_weight"], t["gk_bias"]))
        return (q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, self.head_v_dim),
                {"g": g.view(B, T, H, K)}, {})

    def _log_decay(self, gate_logits: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(gate_logits.float()) / self.gate_logit_normalizer  # fp32 log decay <= 0

    def _output(self, o: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """o [..., H, V] -> the normed (and gated) output [..., value_dim], before o_proj."""
        if self.g_proj is not None:
            return self.g_norm(o, output_gate(t).view(o.shape), weight=t["norm"]).flatten(-2)
        return self.g_norm(o, weight=t["norm"]).flatten(-2)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place (fused recurrent kernel)."""
        B, H = x.shape[0], self.num_heads
        qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1)
        qkv = qkv[:, None] if self.convs is None else fused_conv_decode(self.convs, qkv, cache)  # [B, 1, ...]
        qk, v = qkv.split((2 * self.key_dim, self.value_dim), -1)
        q, k = qk.view(B, 1, 2 * H, self.head_k_dim).chunk(2, 2)
        o = recurrent_step(self.core.decode, q, k, v.view(B, 1, H, self.head_v_dim),
                           g=self._log_decay(self.gk_proj(x)).view(B, 1, H, self.head_k_dim),
                           scale=self.head_k_dim ** -0.5, state=cache["recurrent"])
        t = {"norm": self.g_norm.weight, "gate": self.g_proj(x) if self.g_proj is not None else None}
        return self.o_proj(self._output(o.view(B, H, self.head_v_dim), {}, t))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The recurrent state [B, H, K, V] fp32 and the convs' windows (independent of max_len)."""
        w = self.q_proj.weight
        cache = {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                          device=w.device, dtype=torch.float32)}
        if self.convs is not None:
            cache.update(fused_conv_cache(self.convs, batch_size))
        return cache


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    g = cfg.gla
    return int(cfg.d_model * g.expand_k) // g.num_heads, int(cfg.d_model * g.expand_v) // g.num_heads


register(Mixer("gla", "G", config_key="gla", build=GLA, core=GLA_CORE, head_dims=_head_dims, bidirectional="optional",
               flops=lambda m, seq_len: getattr(m.core, "directions", 1) * chunked_recurrence_flops(
                   m.num_heads, m.head_k_dim, m.head_v_dim)))
