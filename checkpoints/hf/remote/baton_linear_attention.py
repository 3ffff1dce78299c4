"""The linear-attention mixers of an exported Baton model: GLA (letter G, model/gla.py), Mamba2 (M, model/mamba2.py)
and the mLSTM (X, model/mlstm.py), each following baton_layers.py's mixer interface.

All three are a state S [B, H, K, V] decayed and written once per token,

    S_t = a_t S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,

with a per-key decay a_t (GLA), one per head (Mamba2, signed with allow_neg_eigval) or the mLSTM's exponential
gates with their normaliser and max-stabiliser. Each runs as the plain loop over time in fp32, as Baton's reference
kernels do (kernels/gla/naive.py, kernels/mlstm/naive.py), so a prompt and then single tokens continue exactly.
In an encoder (config.is_encoder()) GLA and Mamba2 run both ways (bidirectional_linear_attention), as Baton's
model/bidirectional.py runs them, and carry no state.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baton_layers import GatedRMSNorm, RMSNorm, ShortConvolution


def linear_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                      state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = decay_t * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t in fp32 (q already scaled). q, k [B, T, H, K];
    v [B, T, H, V]; decay [B, T, H, K] (per key) or [B, T, H, 1] (per head); state [B, H, K, V] or None (zeros).
    Returns (o [B, T, H, V] fp32, the final state)."""
    q, k, v, decay = q.float(), k.float(), v.float(), decay.float()
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state
    outputs = []
    for t in range(T):
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, 1), state


def bidirectional_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                                   normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """The encoder's form of linear_recurrence (kernels/lion/chunk.py's, step by step): the recurrence forward, and
    on the reversed sequence with the backward decays (token i's is decay_{i+1}, 1 at the end), token i's own
    k_i v_i^T counted once. normalize (LION) divides each row by its sum, accumulated as one more value column of
    ones; eps is Baton's (model/bidirectional.py). q (already scaled), k [B, T, H, K]; v [B, T, H, V]; decay
    [B, T, H, K or 1]. Returns o [B, T, H, V] fp32."""
    values = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], -1) if normalize else v.float()
    forward, _ = linear_recurrence(q, k, values, decay, None)
    backward_decay = torch.cat([decay[:, 1:], torch.ones_like(decay[:, :1])], 1)
    backward, _ = linear_recurrence(q.flip(1), k.flip(1), values.flip(1), backward_decay.flip(1), None)
    diagonal = (q.float() * k.float()).sum(-1, keepdim=True) * values
    o = forward + backward.flip(1) - diagonal
    return o[..., :-1] / (o[..., -1:] + eps) if normalize else o


def convolve(convs: nn.ModuleDict, inputs: dict, state: dict, new_state: dict) -> list[torch.Tensor]:
    """Each named input through its short conv (convs[name]), continuing from the window state[f"{name}_conv"]
    and writing the new window to new_state under the same key (the cache keys Baton's mixers use)."""
    outputs = []
    for name, x in inputs.items():
        y, new_state[f"{name}_conv"] = convs[name](x, state.get(f"{name}_conv"))
        outputs.append(y)
    return outputs


class GLA(nn.Module):
    """Gated Linear Attention: a per-key decay exp(logsigmoid(gk_proj x) / gate_logit_normalizer), optional short
    convs on q, k and v, the output normed per head (gated by silu(g_proj x) when use_output_gate). State:
    {"recurrent": S [B, H, K, V] fp32, and with short convs the windows "q_conv", "k_conv", "v_conv"}; only the
    windows in an encoder (both ways)."""

    def __init__(self, config):
        super().__init__()
        baton = config.baton
        g, d = baton["gla"], baton["d_model"]
        self.num_heads = g["num_heads"]
        self.key_dim, self.value_dim = int(d * g["expand_k"]), int(d * g["expand_v"])
        self.head_k_dim, self.head_v_dim = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        self.gate_logit_normalizer = g["gate_logit_normalizer"]
        self.bidirectional = config.is_encoder()

        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d, g["gate_low_rank_dim"], bias=False),
                                     nn.Linear(g["gate_low_rank_dim"], self.key_dim, bias=True))
        self.convs = None
        if g["use_short_conv"]:
            self.convs = nn.ModuleDict({name: ShortConvolution(dim, g["conv_size"]) for name, dim in
                                        (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))})
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if g["use_output_gate"] else None
        self.g_norm = (GatedRMSNorm(self.head_v_dim, baton["norm_eps"]) if g["use_output_gate"]
                       else RMSNorm(self.head_v_dim, baton["norm_eps"]))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        state, new_state = state or {}, {}
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs is not None:
            q, k, v = convolve(self.convs, {"q": q, "k": k, "v": v}, state, new_state)
        decay = (F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer).exp().view(B, T, H, K)
        q, k, v = q.view(B, T, H, K).float() * K ** -0.5, k.view(B, T, H, K), v.view(B, T, H, V)
        if self.bidirectional:
            o = bidirectional_linear_attention(q, k, v, decay, normalize=False).to(v.dtype)
        else:
            o, new_state["recurrent"] = linear_recurrence(q, k, v, decay, state.get("recurrent"))
            o = o.to(v.dtype)
        if self.g_proj is not None:
            o = self.g_norm(o, self.g_proj(x).view(o.shape))
        else:
            o = self.g_norm(o)
        return self.o_proj(o.flatten(-2)), new_state


class Mamba2(nn.Module):
    """Mamba2's SSD as GLA with one decay per head: h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t), y_t = C_t^T h_t +
    D x_t, then norm(y * silu(z)). With allow_neg_eigval the transition is 2 exp(dt A) - 1, in (-1, 1). State:
    {"recurrent": h [B, H, N, P] fp32, "conv": the x|B|C conv's window}; only the conv's in an encoder (both ways,
    never with allow_neg_eigval)."""

    def __init__(self, config):
        super().__init__()
        baton = config.baton
        m, d = baton["mamba2"], baton["d_model"]
        self.d_inner = m["expand"] * d
        self.head_dim, self.d_state, self.n_groups = m["head_dim"], m["d_state"], m["n_groups"]
        self.num_heads = self.d_inner // self.head_dim
        self.allow_neg_eigval = m["allow_neg_eigval"]
        self.bidirectional = config.is_encoder()
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        # One projection for z (the gate), x|B|C (convolved together) and dt, as Baton's.
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv = ShortConvolution(self.conv_dim, m["conv_size"], bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, baton["norm_eps"], norm_before_gate=False)
        self.o_proj = nn.Linear(self.d_inner, d, bias=False)

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        state, new_state = state or {}, {}
        B, T, _ = x.shape
        H, P, N, G = self.num_heads, self.head_dim, self.d_state, self.n_groups
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xbc, new_state["conv"] = self.conv(xbc, state.get("conv"))
        xs, b, c = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.view(B, T, H, P)
        b, c = (t.view(B, T, G, N).repeat_interleave(H // G, dim=2) for t in (b, c))
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        log_decay = -torch.exp(self.A_log.float()) * dt
        if self.allow_neg_eigval:
            transition = torch.expm1(log_decay + math.log(2))  # 2 exp(dt A) - 1, accurate near 0
            # |a| floored at 1e-6 as Baton's kernels take it (their log space needs a nonzero magnitude)
            decay = torch.where(transition < 0, -1.0, 1.0) * transition.abs().clamp_min(1e-6)
        else:
            decay = log_decay.exp()
        values = (xs * dt[..., None]).to(xs.dtype)
        if self.bidirectional:
            o = bidirectional_linear_attention(c, b, values, decay[..., None], normalize=False)
        else:
            o, new_state["recurrent"] = linear_recurrence(c, b, values, decay[..., None], state.get("recurrent"))
        y = o.to(xs.dtype) + xs * self.D.to(xs.dtype)[:, None]
        return self.o_proj(self.norm(y.flatten(-2), z)), new_state


class MLSTM(nn.Module):
    """The mLSTM as xLSTM 7B builds it: exponential input gate i and sigmoid forget gate f (pre-activations
    soft-capped at cap tanh(x / cap)), the normaliser n and the max-stabiliser m,

        m_t = max(log f_t + m_{t-1}, i_t)
        C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T    (n_t likewise with k_t)
        h_t = C_t^T q_t / max(|n_t . q_t|, exp(-m_t)),

    then normed per head and gated by silu(g_proj x). State: {"recurrent": C | n [B, H, K, V+1] fp32 (n the last
    column), "stabiliser": m [B, H] fp32}; the empty state is zeros (m = 0), as Baton's."""

    def __init__(self, config):
        super().__init__()
        baton = config.baton
        s, d = baton["mlstm"], baton["d_model"]
        self.num_heads = s["num_heads"]
        self.key_dim, self.value_dim = int(d * s["expand_qk"]), int(d * s["expand_v"])
        self.head_k_dim, self.head_v_dim = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        self.gate_soft_cap = s["gate_soft_cap"]
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.if_proj = nn.Linear(d, 2 * self.num_heads, bias=False)  # input then forget gate, per head
        self.input_gate_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.forget_gate_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.g_norm = GatedRMSNorm(self.head_v_dim, baton["norm_eps"])
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        state = state or {}
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = self.q_proj(x).view(B, T, H, K).float() * K ** -0.5
        k = self.k_proj(x).view(B, T, H, K).float()
        v = self.v_proj(x).view(B, T, H, V)
        cap = self.gate_soft_cap
        bias = torch.cat([self.input_gate_bias, self.forget_gate_bias]).float()
        i, f = (cap * torch.tanh((self.if_proj(x).float() + bias) / cap)).chunk(2, -1)
        log_f = F.logsigmoid(f)
        memory = state.get("recurrent", x.new_zeros(B, H, K, V + 1, dtype=torch.float32))
        m = state.get("stabiliser", x.new_zeros(B, H, dtype=torch.float32))
        # the normaliser n as one more value column of ones: C | n advance together
        values = torch.cat([v.float(), v.new_ones(B, T, H, 1, dtype=torch.float32)], -1)
        outputs = []
        for t in range(T):
            m_new = torch.maximum(log_f[:, t] + m, i[:, t])
            forget, write = torch.exp(log_f[:, t] + m - m_new), torch.exp(i[:, t] - m_new)
            memory = (forget[..., None, None] * memory
                      + write[..., None, None] * k[:, t, :, :, None] * values[:, t, :, None, :])
            m = m_new
            numerator, denominator = torch.einsum("bhk,bhkv->bhv", q[:, t], memory).split([V, 1], -1)
            outputs.append(numerator / torch.maximum(denominator.abs(), torch.exp(-m)[..., None]))
        h = torch.stack(outputs, 1).to(v.dtype)
        out = self.g_norm(h, self.g_proj(x).view(h.shape)).flatten(-2)
        return self.o_proj(out), {"recurrent": memory, "stabiliser": m}
