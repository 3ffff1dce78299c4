"""Gated DeltaNet (Yang et al. 2024): S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T.

The delta rule overwrites the value stored under key k_t (b_t is its learning rate) and the Mamba2-style
scalar decay a_t clears memory wholesale. q and k are L2-normalised so (I - b k k^T) stays a contraction
(for b < 2); allow_neg_eigval lets b reach 2, i.e. reflections, which helps state tracking.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import (chunk_gated_delta_rule, chunk_gated_delta_rule_vjp, fused_recurrent_gated_delta_rule,
                     gated_delta_rule_state_summary)
from model.config import ModelConfig
from model.layers import GatedRMSNorm, RMSNorm
from model.flops import chunked_recurrence_flops
from model.recurrent import (ShortConvolution, fused_conv_cache, fused_conv_decode, init_dt_bias_, mix, output_gate,
                             recurrent_step)
from model.registry import Mixer, RecurrentCore, register

DELTA_RULE_CORE = RecurrentCore("gated_delta_rule", chunk=chunk_gated_delta_rule,
                                chunk_vjp=chunk_gated_delta_rule_vjp, decode=fused_recurrent_gated_delta_rule,
                                state_summary=gated_delta_rule_state_summary)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.gated_deltanet
        d = cfg.d_model
        self.num_heads, self.head_k_dim, self.head_v_dim = c.num_heads, c.head_dim, int(c.head_dim * c.expand_v)
        self.key_dim, self.value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.allow_neg_eigval = c.allow_neg_eigval
        self.core = DELTA_RULE_CORE
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
        tensors = dict(q=self.q_proj(x), k=self.k_proj(x), v=self.v_proj(x), a=self.a_proj(x), b=self.b_proj(x),
                       A_log=self.A_log, dt_bias=self.dt_bias, norm=self.o_norm.weight,
                       **{f"{name}_conv": conv.weight for name, conv in self.convs.items()})
        if self.g_proj is not None:
            tensors.update(x=x, gate_weight=self.g_proj.weight)
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj,
                   scale=self.head_k_dim ** -0.5, cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The projections (and the parameters in t) -> L2-normed q, k, v [B, T, H, *], the log decay g and beta."""
        B, T, H, K = *t["q"].shape[:2], self.num_heads, self.head_k_dim
        q, k, v = (self.convs[name](t[name], cu_seqlens, sp, cache, weight=t[f"{name}_conv"]) for name in "qkv")
        q = F.normalize(q.view(B, T, H, K).float(), dim=-1).to(v.dtype)
        k = F.normalize(k.view(B, T, H, K).float(), dim=-1).to(v.dtype)
        g, beta = self._gates(t["a"], t["b"], t["A_log"], t["dt_bias"])
        return q, k, v.view(B, T, H, self.head_v_dim), {"g": g, "beta": beta}, {}

    def _gates(self, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
               dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log decay g, write strength beta) [..., H] fp32 from the projections a, b [..., H]."""
        beta = torch.sigmoid(b.float())
        if self.allow_neg_eigval:
            beta = beta * 2
        g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
        return g, beta

    def _output(self, o: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """o [..., H, V] -> the normed (and gated) output [..., value_dim], before o_proj."""
        if self.g_proj is not None:
            return self.o_norm(o, output_gate(t).view(o.shape), weight=t["norm"]).flatten(-2)
        return self.o_norm(o, weight=t["norm"]).flatten(-2)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place (fused recurrent kernel)."""
        B, H = x.shape[0], self.num_heads
        qkv = fused_conv_decode(self.convs, torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1), cache)
        qk, v = qkv.split((2 * self.key_dim, self.value_dim), -1)
        # q and k L2-normalised together: 2H vectors of head_k_dim.
        qk = F.normalize(qk.reshape(B, 1, 2 * H, self.head_k_dim).float(), dim=-1).to(v.dtype)
        q, k = qk.chunk(2, 2)
        g, beta = self._gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)  # [B, H]: 2-D matmuls
        o = recurrent_step(self.core.decode, q, k, v.view(B, 1, H, self.head_v_dim), g=g[:, None],
                           beta=beta[:, None], scale=self.head_k_dim ** -0.5, state=cache["recurrent"])
        t = {"norm": self.o_norm.weight, "gate": self.g_proj(x) if self.g_proj is not None else None}
        return self.o_proj(self._output(o.view(B, H, self.head_v_dim), {}, t))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The recurrent state [B, H, K, V] fp32 and the convs' windows (independent of max_len)."""
        cache = {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                          device=self.A_log.device, dtype=torch.float32)}
        cache.update(fused_conv_cache(self.convs, batch_size))
        return cache


register(Mixer("gated_deltanet", "D", config_key="gated_deltanet", build=GatedDeltaNet, core=DELTA_RULE_CORE,
               head_dims=lambda cfg: (cfg.gated_deltanet.head_dim,
                                      int(cfg.gated_deltanet.head_dim * cfg.gated_deltanet.expand_v)),
               flops=lambda m, seq_len: chunked_recurrence_flops(m.num_heads, m.head_k_dim, m.head_v_dim,
                                                                 delta_rule=True)))
