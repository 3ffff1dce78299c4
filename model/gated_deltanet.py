"""The delta-rule mixers: Gated DeltaNet, DeltaNet and Gated DeltaProduct, one module in three configurations.

Gated DeltaNet (Yang et al. 2024): S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T. The delta rule
overwrites the value stored under key k_t (b_t is its learning rate) and the Mamba2-style scalar decay a_t
clears memory wholesale. q and k are L2-normalised so (I - b k k^T) stays a contraction (for b < 2);
allow_neg_eigval lets b reach 2, i.e. reflections (negative eigenvalues), which state tracking needs
(Grazzi et al. 2025).
- DeltaNet (letter E): the same without the decay (a_t = 1: log gate 0), on the same kernels.
- Gated DeltaProduct (Siems et al. 2025, letter P): num_householder delta-rule steps per token, each with its
  own key, value and b (from projections num_householder times wider), the decay once per token: the gated
  delta rule over the interleaved sub-steps (kernels/gated_delta_product).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import (chunk_gated_delta_product, chunk_gated_delta_rule, chunk_gated_delta_rule_vjp,
                     fused_recurrent_gated_delta_product, fused_recurrent_gated_delta_rule,
                     gated_delta_product_state_summary, gated_delta_rule_state_summary)
from model.config import DeltaNetConfig, GatedDeltaNetConfig, GatedDeltaProductConfig, ModelConfig
from model.layers import GatedRMSNorm, RMSNorm
from model.flops import chunked_recurrence_flops
from model.recurrent import (ShortConvolution, fused_conv_cache, fused_conv_decode, init_dt_bias_, mix, output_gate,
                             recurrent_step)
from model.registry import Mixer, RecurrentCore, register

DELTA_RULE_CORE = RecurrentCore("gated_delta_rule", chunk=chunk_gated_delta_rule,
                                chunk_vjp=chunk_gated_delta_rule_vjp, decode=fused_recurrent_gated_delta_rule,
                                state_summary=gated_delta_rule_state_summary)
# The gated delta rule's kernels on the interleaved Householder sub-steps (hence its kernel name).
DELTA_PRODUCT_CORE = RecurrentCore("gated_delta_rule", chunk=chunk_gated_delta_product,
                                   decode=fused_recurrent_gated_delta_product,
                                   state_summary=gated_delta_product_state_summary)


class GatedDeltaNet(nn.Module):
    """A delta-rule mixer configured by its settings c (a ModelConfig field): the decay a_t when c is a
    GatedDeltaNetConfig, c.num_householder steps per token when it has them (Gated DeltaProduct)."""

    def __init__(self, cfg: ModelConfig, c: Optional[DeltaNetConfig] = None):
        super().__init__()
        c = cfg.gated_deltanet if c is None else c
        d = cfg.d_model
        self.num_heads, self.head_k_dim, self.head_v_dim = c.num_heads, c.head_dim, int(c.head_dim * c.expand_v)
        self.key_dim, self.value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.num_householder = getattr(c, "num_householder", 1)
        self.product = isinstance(c, GatedDeltaProductConfig)  # its k, v and beta have an n_h axis
        self.core = DELTA_PRODUCT_CORE if self.product else DELTA_RULE_CORE
        self.gated = isinstance(c, GatedDeltaNetConfig)
        self.allow_neg_eigval = c.allow_neg_eigval
        n_h = self.num_householder

        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, n_h * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, n_h * self.value_dim, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(d, self.num_heads, bias=False)  # decay step size
        self.b_proj = nn.Linear(d, n_h * self.num_heads, bias=False)  # delta-rule learning rate per step
        self.convs = nn.ModuleDict({
            name: ShortConvolution(dim, c.conv_size, cache_key=f"{name}_conv")
            for name, dim in (("q", self.key_dim), ("k", n_h * self.key_dim), ("v", n_h * self.value_dim))})
        if self.gated:
            self.dt_min, self.dt_max, self.dt_init_floor = c.dt_min, c.dt_max, c.dt_init_floor
            self.A_log = nn.Parameter(torch.empty(self.num_heads))
            self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if c.use_output_gate else None
        self.o_norm = (GatedRMSNorm(self.head_v_dim, cfg.norm_eps) if c.use_output_gate
                       else RMSNorm(self.head_v_dim, cfg.norm_eps))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """A uniform in [0, 16] and dt as Mamba2's (in place: works on DTensors too)."""
        if not self.gated:
            return
        with torch.no_grad():
            self.A_log.uniform_(0, 16).clamp_(min=1e-4).log_()
        init_dt_bias_(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)

    def _heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Projected q [..., key_dim], k [..., n_h key_dim], v [..., n_h value_dim] -> q [..., H, K] and, per
        Householder step, k [..., (n_h,) H, K] and v [..., (n_h,) H, V] (the n_h axis only for a DeltaProduct),
        q and k L2-normalised (in fp32)."""
        lead, H = q.shape[:-1], self.num_heads
        steps = (self.num_householder,) if self.product else ()
        q = F.normalize(q.view(*lead, H, self.head_k_dim).float(), dim=-1).to(v.dtype)
        k = F.normalize(k.view(*lead, *steps, H, self.head_k_dim).float(), dim=-1).to(v.dtype)
        return q, k, v.view(*lead, *steps, H, self.head_v_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        tensors = dict(q=self.q_proj(x), k=self.k_proj(x), v=self.v_proj(x), b=self.b_proj(x), norm=self.o_norm.weight,
                       **{f"{name}_conv": conv.weight for name, conv in self.convs.items()})
        if self.gated:
            tensors.update(a=self.a_proj(x), A_log=self.A_log, dt_bias=self.dt_bias)
        if self.g_proj is not None:
            tensors.update(x=x, gate_weight=self.g_proj.weight)
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj,
                   scale=self.head_k_dim ** -0.5, cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The projections (and the parameters in t) -> L2-normed q, k and v [B, T, (n_h,) H, *], the log decay g
        and beta."""
        q, k, v = (self.convs[name](t[name], cu_seqlens, sp, cache, weight=t[f"{name}_conv"]) for name in "qkv")
        q, k, v = self._heads(q, k, v)
        g, beta = self._gates(t)
        return q, k, v, {"g": g, "beta": beta}, {}

    def _gates(self, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log decay g [..., H], write strength beta [..., (n_h,) H]) fp32 from the projections t["a"], t["b"]
        and the parameters in t; without the decay (DeltaNet) g is 0."""
        b = t["b"]
        beta = torch.sigmoid(b.float())
        if self.product:
            beta = beta.view(*b.shape[:-1], self.num_householder, self.num_heads)
        if self.allow_neg_eigval:
            beta = beta * 2
        if not self.gated:
            return b.new_zeros(*b.shape[:-1], self.num_heads, dtype=torch.float32), beta
        g = -torch.exp(t["A_log"].float()) * F.softplus(t["a"].float() + t["dt_bias"].float())
        return g, beta

    def _output(self, o: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """o [..., H, V] -> the normed (and gated) output [..., value_dim], before o_proj."""
        if self.g_proj is not None:
            return self.o_norm(o, output_gate(t).view(o.shape), weight=t["norm"]).flatten(-2)
        return self.o_norm(o, weight=t["norm"]).flatten(-2)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place (fused recurrent kernel)."""
        qkv = fused_conv_decode(self.convs, torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1), cache)
        q, k, v = self._heads(*qkv.split((self.key_dim, self.num_householder * self.key_dim,
                                          self.num_householder * self.value_dim), -1))
        t = {"b": self.b_proj(x)}  # [B, ...]: 2-D matmuls
        if self.gated:
            t.update(a=self.a_proj(x), A_log=self.A_log, dt_bias=self.dt_bias)
        g, beta = self._gates(t)
        o = recurrent_step(self.core.decode, q, k, v, g=g[:, None], beta=beta[:, None],
                           scale=self.head_k_dim ** -0.5, state=cache["recurrent"])
        t = {"norm": self.o_norm.weight, "gate": self.g_proj(x) if self.g_proj is not None else None}
        return self.o_proj(self._output(o[:, 0], {}, t))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The recurrent state [B, H, K, V] fp32 and the convs' windows (independent of max_len)."""
        cache = {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                          device=self.q_proj.weight.device, dtype=torch.float32)}
        cache.update(fused_conv_cache(self.convs, batch_size))
        return cache


def _register(name: str, letter: str, core: RecurrentCore) -> None:
    settings = lambda cfg: getattr(cfg, name)  # noqa: E731
    register(Mixer(name, letter, config_key=name, build=lambda cfg: GatedDeltaNet(cfg, settings(cfg)), core=core,
                   head_dims=lambda cfg: (settings(cfg).head_dim, int(settings(cfg).head_dim * settings(cfg).expand_v)),
                   # A DeltaProduct runs the delta rule over num_householder sub-steps per token.
                   flops=lambda m, seq_len: m.num_householder * chunked_recurrence_flops(
                       m.num_heads, m.head_k_dim, m.head_v_dim, delta_rule=True)))


_register("gated_deltanet", "D", DELTA_RULE_CORE)
_register("deltanet", "E", DELTA_RULE_CORE)
_register("gated_deltaproduct", "P", DELTA_PRODUCT_CORE)
