"""The delta-rule mixers of an exported Baton model (model/gated_deltanet.py): Gated DeltaNet (letter D), DeltaNet
(E) and Gated DeltaProduct (P), one module in three configurations, as Baton builds them.

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)

q and k are L2-normalised per head after their short convs; b = sigmoid(b_proj x) (times 2 with allow_neg_eigval,
so transitions may reflect); the decay a_t = exp(-exp(A_log) softplus(a_proj x + dt_bias)) only for D and P
(DeltaNet: a_t = 1). Gated DeltaProduct takes num_householder such delta-rule steps per token, each with its own
k, v and b (projections num_householder times wider), after the token's decay. The output is normed per head
(gated by silu(g_proj x) when use_output_gate) and projected back by o_proj.

The recurrence is the plain loop over time in fp32 (kernels/gated_delta_rule/naive.py,
kernels/gated_delta_product/naive.py): the reference Baton's chunked kernels are tested against.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .baton_layers import GatedRMSNorm, RMSNorm, ShortConvolution, l2_normalize

SETTINGS = {"D": "gated_deltanet", "E": "deltanet", "P": "gated_deltaproduct"}  # the ModelConfig field of each


class DeltaRuleMixer(nn.Module):
    """The delta-rule mixer of layer letter D, E or P; its state is {"recurrent": S [B, H, K, V] fp32, and the
    windows "q_conv", "k_conv", "v_conv" of the short convs}."""

    def __init__(self, config, letter: str):
        super().__init__()
        baton = config.baton
        c = baton[SETTINGS[letter]]
        d = baton["d_model"]
        self.gated = letter in "DP"
        self.num_householder = c["num_householder"] if letter == "P" else 1
        self.allow_neg_eigval = c["allow_neg_eigval"]
        self.num_heads, self.head_k_dim = c["num_heads"], c["head_dim"]
        self.head_v_dim = int(c["head_dim"] * c["expand_v"])
        self.key_dim, self.value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        n_h = self.num_householder

        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, n_h * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, n_h * self.value_dim, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(d, self.num_heads, bias=False)
        self.b_proj = nn.Linear(d, n_h * self.num_heads, bias=False)
        self.convs = nn.ModuleDict({name: ShortConvolution(dim, c["conv_size"]) for name, dim in
                                    (("q", self.key_dim), ("k", n_h * self.key_dim), ("v", n_h * self.value_dim))})
        if self.gated:
            self.A_log = nn.Parameter(torch.zeros(self.num_heads))
            self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if c["use_output_gate"] else None
        self.o_norm = (GatedRMSNorm(self.head_v_dim, baton["norm_eps"]) if c["use_output_gate"]
                       else RMSNorm(self.head_v_dim, baton["norm_eps"]))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        state = state or {}
        B, T, _ = x.shape
        H, n_h = self.num_heads, self.num_householder
        new_state = {}
        q, k, v = (self._conv(name, proj(x), state, new_state)
                   for name, proj in (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj)))
        q = l2_normalize(q.view(B, T, H, self.head_k_dim)) * self.head_k_dim ** -0.5
        k = l2_normalize(k.view(B, T, n_h, H, self.head_k_dim))
        v = v.view(B, T, n_h, H, self.head_v_dim).float()
        beta = torch.sigmoid(self.b_proj(x).float()).view(B, T, n_h, H)
        if self.allow_neg_eigval:
            beta = beta * 2
        decay = self._decay(x)

        S = state.get("recurrent")
        S = x.new_zeros(B, H, self.head_k_dim, self.head_v_dim, dtype=torch.float32) if S is None else S.float()
        outputs = []
        for t in range(T):
            if decay is not None:
                S = decay[:, t, :, None, None] * S
            for j in range(n_h):  # the token's Householder steps (one outside a DeltaProduct)
                k_j = k[:, t, j]
                u = beta[:, t, j, :, None] * (v[:, t, j] - torch.einsum("bhk,bhkv->bhv", k_j, S))
                S = S + k_j[..., :, None] * u[..., None, :]
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        new_state["recurrent"] = S
        o = torch.stack(outputs, 1) if outputs else v.new_zeros(B, 0, H, self.head_v_dim)
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2).to(x.dtype)), new_state

    def _conv(self, name: str, x: torch.Tensor, state: dict, new_state: dict) -> torch.Tensor:
        """The short conv `name` of the projection x after its carried window, whose successor goes to new_state."""
        y, new_state[f"{name}_conv"] = self.convs[name](x, state.get(f"{name}_conv"))
        return y

    def _decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """a_t [B, T, H] fp32, or None without a gate (DeltaNet)."""
        if not self.gated:
            return None
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return g.exp()
