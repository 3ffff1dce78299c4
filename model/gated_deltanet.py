"""Gated DeltaNet (Yang et al. 2024): S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T.

The delta rule overwrites the value stored under key k_t (b_t is its learning rate) and the Mamba2-style
scalar decay a_t clears memory wholesale. q and k are L2-normalised so (I - b k k^T) stays a contraction
(for b < 2); allow_neg_eigval lets b reach 2, i.e. reflections, which helps state tracking.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, gated_delta_rule_state_summary
from model.config import ModelConfig
from model.flops import chunked_recurrence_flops
from model.layers import GatedRMSNorm, RMSNorm
from model.recurrent import ShortConvolution, init_dt_bias_, recurrent_scan
from model.registry import Mixer, RecurrentCore, register

DELTA_RULE_CORE = RecurrentCore("gated_delta_rule", chunk=chunk_gated_delta_rule,
                                decode=fused_recurrent_gated_delta_rule,
                                state_summary=gated_delta_rule_state_summary)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.gated_deltanet
        d = cfg.d_model
        self.num_heads, self.head_k_dim, self.head_v_dim = c.num_heads, c.head_dim, int(c.head_dim * c.expand_v)
        self.key_dim, self.value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.allow_neg_eigval = c.allow_neg_eigval
        self.dt_min, self.dt_max, self.dt_init_floor = c.dt_min, c.dt_max, c.dt_init_floor

        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.num_heads, bias=False)  # decay step size
        self.b_proj = nn.Linear(d, self.num_heads, bias=False)  # delta-rule learning rate
        self.convs = nn.ModuleDict({
            name: ShortConvolution(dim, c.conv_size, cache_key=f"{name}_conv")
            for name, dim in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))})
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if c.use_output_gate else None
        self.o_norm = (GatedRMSNorm(self.head_v_dim, cfg.norm_eps) if c.use_output_gate
                       else RMSNorm(self.head_v_dim, cfg.norm_eps))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """A uniform in [0, 16] and dt as Mamba2's (in place: works on DTensors too)."""
        with torch.no_grad():
            self.A_log.uniform_(0, 16).clamp_(min=1e-4).log_()
        init_dt_bias_(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        q = self.convs["q"](self.q_proj(x), cu_seqlens, sp, cache).view(B, T, H, self.head_k_dim)
        k = self.convs["k"](self.k_proj(x), cu_seqlens, sp, cache).view(B, T, H, self.head_k_dim)
        v = self.convs["v"](self.v_proj(x), cu_seqlens, sp, cache).view(B, T, H, self.head_v_dim)
        q = F.normalize(q.float(), dim=-1).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.allow_neg_eigval:
            beta = beta * 2
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

        o = recurrent_scan(DELTA_RULE_CORE, q, k, v, g=g, beta=beta,
                           scale=self.head_k_dim ** -0.5, cu_seqlens=cu_seqlens, sp=sp, cache=cache)
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, self.value_dim))

    def init_cache(self, batch_size: int) -> dict:
        cache = {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                          device=self.A_log.device, dtype=torch.float32)}
        for conv in self.convs.values():
            cache[conv.cache_key] = conv.init_cache(batch_size)
        return cache


register(Mixer("gated_deltanet", "D", config_key="gated_deltanet", build=GatedDeltaNet, core=DELTA_RULE_CORE,
               head_dims=lambda cfg: (cfg.gated_deltanet.head_dim,
                                      int(cfg.gated_deltanet.head_dim * cfg.gated_deltanet.expand_v)),
               flops=lambda m, seq_len: chunked_recurrence_flops(m.num_heads, m.head_k_dim, m.head_v_dim,
                                                                 delta_rule=True)))
