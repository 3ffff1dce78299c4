"""The RG-LRU recurrent block of Hawk and Griffin (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences
with Local Attention for Efficient Language Models").

Two branches of width D_RNN (model.rglru.width, 4/3 d_model by default) from the block's input x:
    gate   = GeLU(W_y x)
    branch = RG-LRU(Conv1D(W_x x))         (a causal depthwise conv of width 4, with bias, no activation)
    out    = W_o (gate * branch)
The Real-Gated Linear Recurrent Unit on the conv's output x_t, per channel:
    r_t = sigmoid(W_a x_t + b_a)                    recurrence gate
    i_t = sigmoid(W_x x_t + b_x)                    input gate
    log a_t = -c softplus(Lambda) r_t,  c = 8       so a_t = a^(c r_t) with a = exp(-softplus(Lambda)) in (0, 1)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)
The gates are block-diagonal, one dense block per head (as in the paper and recurrentgemma), not dense over
D_RNN; Lambda starts so that a^c is uniform in [0.9, 0.999]. sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t)) in fp32,
its derivative capped (recurrentgemma's: it grows without bound as a_t -> 1). In training the block runs as the
other recurrent mixers do (model/recurrent.py mix): it keeps the branch's projection, the block's input and the
scan's output; the GeLU gate, the conv and the gates are recomputed in the backward (the gates' elementwise work
by RGLRUGates), the scan's backward runs alone (chunk_diagonal_scan_kv_vjp). recurrentgemma also skips the
sqrt(1 - a^2) factor at a document's first token; here every token takes the same formula.
The scan is the diagonal scan (kernels/diagonal_scan) in the recurrent cores' form: its state is one column
per head, [N, H, D_RNN / H, 1] fp32, so packing, decoding and sequence parallelism run as for every other core.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.common import compute_dtype
from kernels.diagonal_scan.core_form import (chunk_diagonal_scan_kv, chunk_diagonal_scan_kv_vjp,
                                             diagonal_scan_kv_state_summary, fused_recurrent_diagonal_scan_kv)
from model.config import ModelConfig
from model.recurrent import ShortConvolution, mix, output_gate, recurrent_step
from model.registry import Mixer, RecurrentCore, register

# h_t = a_t h_{t-1} + k_t v_t elementwise, o_t = h_t (the q slot unused): the RG-LRU with k = sqrt(1 - a^2) i, v = x.
RGLRU_CORE = RecurrentCore("diagonal_scan", chunk=chunk_diagonal_scan_kv, chunk_vjp=chunk_diagonal_scan_kv_vjp,
                           decode=fused_recurrent_diagonal_scan_kv, state_summary=diagonal_scan_kv_state_summary)

GATE_EXPONENT = 8.0  # c
A_MIN, A_MAX = 0.9, 0.999  # a^c starts uniform in this range
MAX_SQRT_GRAD = 1000.0  # the largest derivative of sqrt(1 - a^2) passed back (recurrentgemma's bound)


class RGLRUGates(torch.autograd.Function):
    """(a_t, sqrt(1 - a_t^2) i_t), both [..., H, D_h] fp32, from the gate logits W x [..., H, 2 D_h] (input gate
    then recurrence gate), their bias [H, 2 D_h] and Lambda [H, D_h]. Elementwise work whose intermediates
    (sigmoids, log a, 1 - a^2, ...) would be kept for the backward in fp32, a dozen bytes per channel and token:
    only the logits are kept, the rest recomputed. The derivative of the sqrt is capped at MAX_SQRT_GRAD."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bias: torch.Tensor, Lambda: torch.Tensor):
        ctx.save_for_backward(logits, bias, Lambda)
        _, _, _, _, a, multiplier, input_gate = _gate_values(logits, bias, Lambda)
        return a, multiplier * input_gate

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_a: torch.Tensor, d_scale: torch.Tensor):
        logits, bias, Lambda = ctx.saved_tensors
        gates, softplus_lambda, recurrence_gate, one_minus_a2, a, multiplier, input_gate = _gate_values(
            logits, bias, Lambda)
        d_input_gate = d_scale * multiplier
        d_one_minus_a2 = d_scale * input_gate / (2 * torch.sqrt(one_minus_a2.clamp_min(1 / (4 * MAX_SQRT_GRAD ** 2))))
        d_log_a = d_a * a - 2 * a * a * d_one_minus_a2  # 1 - a^2 = 1 - exp(2 log a)
        d_recurrence_gate = -GATE_EXPONENT * softplus_lambda * d_log_a
        d_softplus = (-GATE_EXPONENT * recurrence_gate * d_log_a).flatten(0, -3).sum(0)
        d_gates = torch.cat([d_input_gate, d_recurrence_gate], -1) * gates * (1 - gates)
        d_bias = d_gates.flatten(0, -3).sum(0)
        return d_gates.to(logits.dtype), d_bias.to(bias.dtype), (d_softplus * torch.sigmoid(Lambda.to(d_softplus.dtype))).to(
            Lambda.dtype)


def _gate_values(logits: torch.Tensor, bias: torch.Tensor, Lambda: torch.Tensor):
    """(both gates, softplus(Lambda), r_t, 1 - a_t^2, a_t, sqrt(1 - a_t^2), i_t), fp32 (fp64 for fp64 logits)."""
    dtype = compute_dtype(logits)
    gates = torch.sigmoid(logits.to(dtype) + bias.to(dtype))
    input_gate, recurrence_gate = gates.chunk(2, dim=-1)
    softplus_lambda = F.softplus(Lambda.to(dtype))
    log_a = -GATE_EXPONENT * softplus_lambda * recurrence_gate
    one_minus_a2 = -torch.expm1(2 * log_a)  # no cancellation as a_t -> 1
    return (gates, softplus_lambda, recurrence_gate, one_minus_a2, log_a.exp(), torch.sqrt(one_minus_a2),
            input_gate)


class RGLRU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.rglru
        self.width = c.recurrent_width(cfg.d_model)
        self.num_heads = c.num_heads
        self.head_dim = self.width // c.num_heads
        self.core = RGLRU_CORE
        # W_y (the GeLU gate) and W_x (the recurrent branch) as one matmul.
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.width, bias=False)
        self.conv = ShortConvolution(self.width, c.conv_size, bias=True, activation=None, cache_key="conv")
        # The gates' block-diagonal weights, input gate and recurrence gate side by side: [H, D_h, 2 D_h].
        self.gate_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim, 2 * self.head_dim))
        self.gate_bias = nn.Parameter(torch.empty(self.num_heads, 2 * self.head_dim))
        self.Lambda = nn.Parameter(torch.empty(self.width))
        self.o_proj = nn.Linear(self.width, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Gates N(0, 1/D_h) with zero bias (a fan-in init per block), Lambda such that a^c is uniform in
        [A_MIN, A_MAX]: softplus(Lambda) = -log(u) / c. In place only (sharded parameters after a meta build)."""
        with torch.no_grad():
            self.gate_weight.normal_(0.0, self.head_dim ** -0.5)
            self.gate_bias.zero_()
            # u ~ U[A_MIN, A_MAX], s = -log(u) / c, Lambda = softplus^-1(s) = log(expm1(s)).
            self.Lambda.uniform_(A_MIN, A_MAX).log_().div_(-GATE_EXPONENT).expm1_().log_()

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        # W_y (the GeLU gate's rows of in_proj) and W_x as two matmuls: the gate is recomputed from x, not kept
        gate_weight, branch_weight = self.in_proj.weight.chunk(2)
        tensors = dict(branch=F.linear(x, branch_weight), x=x, gate_weight=gate_weight, conv=self.conv.weight,
                       conv_bias=self.conv.bias, lru_weight=self.gate_weight, lru_bias=self.gate_bias,
                       Lambda=self.Lambda)
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj, scale=1.0,
                   cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The branch's projection (and the parameters in t) -> the scan's k = sqrt(1 - a^2) i (also in the unused
        q slot), v = the conv's output [B, T, H, D_h] and its gate a."""
        B, T, _ = t["branch"].shape
        branch = self.conv(t["branch"], cu_seqlens, sp, cache, weight=t["conv"], bias=t["conv_bias"])
        branch = branch.view(B, T, self.num_heads, self.head_dim)
        a, scale_in = self._gates(branch, t["lru_weight"], t["lru_bias"], t["Lambda"])
        return scale_in, scale_in, branch, {"a": a}, {}

    def _gates(self, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               Lambda: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sqrt(1 - a_t^2) i_t), both [..., H, D_h] fp32, of the conv's output [..., H, D_h]."""
        logits = torch.einsum("...hi,hij->...hj", branch, weight.to(branch.dtype))
        return RGLRUGates.apply(logits, bias, Lambda.view(self.num_heads, self.head_dim))

    def _output(self, h: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """The scan's output [..., H, D_h] -> GeLU(W_y x) * h [..., D_RNN], before o_proj."""
        return F.gelu(output_gate(t), approximate="tanh") * h.flatten(-2)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place (fused recurrent kernel)."""
        B = x.shape[0]
        gate, branch = self.in_proj(x).chunk(2, dim=-1)
        branch = self.conv.step(branch[:, None], cache["conv"]).view(B, 1, self.num_heads, self.head_dim)
        a, scale_in = self._gates(branch, self.gate_weight, self.gate_bias, self.Lambda)
        h = recurrent_step(self.core.decode, scale_in, scale_in, branch, a=a, scale=1.0, state=cache["recurrent"])
        return self.o_proj(self._output(h[:, 0], {}, {"gate": gate}))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The recurrent state [B, H, D_h, 1] fp32 and the conv's window (independent of max_len)."""
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_dim, 1, device=self.Lambda.device,
                                         dtype=torch.float32),
                "conv": self.conv.init_cache(batch_size)}


def rglru_flops(mixer: RGLRU, seq_len: int) -> float:
    """Per token: the block-diagonal gates (two D_h x D_h blocks per head) and the scan's multiply-add."""
    return 2 * mixer.width * 2 * mixer.head_dim + 2 * mixer.width


register(Mixer("rglru", "R", config_key="rglru", build=RGLRU, core=RGLRU_CORE,
               head_dims=lambda cfg: (cfg.rglru.recurrent_width(cfg.d_model) // cfg.rglru.num_heads, 1),
               flops=rglru_flops))
