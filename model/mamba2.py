"""Mamba2 (Dao & Gu 2024) as the scalar-gate case of GLA.

The SSD recurrence h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t), y_t = C_t^T h_t + D x_t is chunk_gla with
q = C, k = B, v = dt * x, g = dt * A (one log decay per head) and scale 1.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import (chunk_gla, chunk_gla_signed, chunk_gla_signed_vjp, chunk_gla_vjp, fused_recurrent_gla,
                     fused_recurrent_gla_signed, gla_signed_state_summary, gla_state_summary)
from model.config import ModelConfig
from model.layers import GatedRMSNorm
from model.bidirectional import BidirectionalCore
from model.flops import chunked_recurrence_flops
from model.recurrent import ShortConvolution, init_dt_bias_, mix, output_gate, recurrent_step
from model.registry import Mixer, RecurrentCore, register

# GLA's ops with one log decay per head and step (the scalar gate).
MAMBA2_CORE = RecurrentCore("gla_scalar", chunk=chunk_gla, chunk_vjp=chunk_gla_vjp, decode=fused_recurrent_gla,
                            state_summary=gla_state_summary)
# The same with the transition's sign as a second gate (allow_neg_eigval): kernels/gla/signed.py.
SIGNED_MAMBA2_CORE = RecurrentCore("gla_scalar", chunk=chunk_gla_signed, chunk_vjp=chunk_gla_signed_vjp,
                                   decode=fused_recurrent_gla_signed, state_summary=gla_signed_state_summary)


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mamba2
        self.dt_min, self.dt_max, self.dt_init_floor = m.dt_min, m.dt_max, m.dt_init_floor
        self.d_inner = m.expand * cfg.d_model
        self.head_dim, self.d_state, self.n_groups = m.head_dim, m.d_state, m.n_groups
        self.num_heads = self.d_inner // m.head_dim
        self.allow_neg_eigval = m.allow_neg_eigval
        self.core = SIGNED_MAMBA2_CORE if m.allow_neg_eigval else MAMBA2_CORE
        if cfg.is_encoder:  # bidirectional (model/bidirectional.py; the signed transition has no such form)
            self.core = BidirectionalCore(MAMBA2_CORE, cfg.lion.form)
        conv_dim = self.d_inner + 2 * m.n_groups * m.d_state
        # One projection for z (gate), x|B|C (convolved together) and dt, as in the reference code.
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + conv_dim + self.num_heads, bias=False)
        self.conv = ShortConvolution(conv_dim, m.conv_size, bias=True, cache_key="conv")
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, cfg.norm_eps, norm_before_gate=False)
        self.o_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """dt log-uniform in [dt_min, dt_max] through an inverse softplus bias, A uniform in [1, 16], D = 1.
        In-place only, so it also works on sharded (DTensor) parameters after meta-device construction."""
        init_dt_bias_(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)
        with torch.no_grad():
            self.A_log.uniform_(1, 16).log_()
            self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        # z (the output gate) and x|B|C|dt as two matmuls: z is recomputed in the backward, not kept
        z_weight, xbcdt_weight = self.in_proj.weight.split([self.d_inner, self.in_proj.out_features - self.d_inner])
        tensors = dict(xbcdt=F.linear(x, xbcdt_weight), x=x, gate_weight=z_weight, conv=self.conv.weight,
                       conv_bias=self.conv.bias, dt_bias=self.dt_bias, A_log=self.A_log, D=self.D,
                       norm=self.norm.weight)
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj, scale=1.0,
                   cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The projection x|B|C|dt (and the parameters in t) -> the scan's q = C, k = B, v = dt * x, g = dt * A,
        and x for the output."""
        xbc, dt = t["xbcdt"].split([self.conv.dim, self.num_heads], dim=-1)
        xbc = self.conv(xbc, cu_seqlens, sp, cache, weight=t["conv"], bias=t["conv_bias"])
        xs, c, b, v, gates = self._ssm_inputs(xbc, dt, t["dt_bias"], t["A_log"])
        return c, b, v, gates, {"xs": xs}

    def _ssm_inputs(self, xbc: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor):
        """The convolved x|B|C [B, T, conv_dim] and dt [B, T, H] -> (x [B, T, H, P], then the scan's q = C, k = B,
        v = dt * x and its gates: g = dt * A, or with negative eigenvalues the transition a = 2 exp(dt A) - 1 as
        g = log|a| and its sign)."""
        B, T, _ = xbc.shape
        H, P, N, G = self.num_heads, self.head_dim, self.d_state, self.n_groups
        xs, b, c = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + dt_bias.float())  # [B, T, H], fp32
        log_decay = -torch.exp(A_log.float()) * dt
        xs = xs.view(B, T, H, P)
        b = b.view(B, T, G, N).repeat_interleave(H // G, dim=2)
        c = c.view(B, T, G, N).repeat_interleave(H // G, dim=2)
        gates = {"g": log_decay}
        if self.allow_neg_eigval:
            a = torch.expm1(log_decay + math.log(2))  # 2 exp(dt A) - 1, accurate near 0
            gates = {"g": a.abs().clamp_min(1e-6).log(), "sign": torch.where(a < 0, -1.0, 1.0)}
        return xs, c, b, (xs * dt[..., None]).to(xs.dtype), gates

    def _output(self, o: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """o [..., H, P] -> the skip-connected, gated and normed output [..., d_inner], before o_proj."""
        xs = extras["xs"]
        y = o + xs * t["D"].to(xs.dtype)[:, None]
        return self.norm(y.flatten(-2), output_gate(t), weight=t["norm"])

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place (fused recurrent kernel)."""
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv.dim, self.num_heads], dim=-1)  # one matmul
        xs, c, b, v, gates = self._ssm_inputs(self.conv.step(xbc[:, None], cache["conv"]), dt[:, None],
                                              self.dt_bias, self.A_log)
        o = recurrent_step(self.core.decode, c, b, v, **gates, scale=1.0, state=cache["recurrent"])
        return self.o_proj(self._output(o[:, 0], {"xs": xs[:, 0]}, {"gate": z, "D": self.D, "norm": self.norm.weight}))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The recurrent state [B, H, N, P] fp32 and the conv's window (independent of max_len)."""
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.d_state, self.head_dim,
                                         device=self.A_log.device, dtype=torch.float32),
                "conv": self.conv.init_cache(batch_size)}


register(Mixer("mamba2", "M", config_key="mamba2", build=Mamba2, core=MAMBA2_CORE, bidirectional="optional",
               head_dims=lambda cfg: (cfg.mamba2.d_state, cfg.mamba2.head_dim),
               flops=lambda m, seq_len: getattr(m.core, "directions", 1) * chunked_recurrence_flops(
                   m.num_heads, m.d_state, m.head_dim)))
