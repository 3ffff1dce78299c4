"""LION, the encoder's bidirectional linear attention (model/lion.py), following baton_layers.py's mixer interface:
letters F (LION-LIT), N (LION-D) and B (LION-S).

    q, k = phi(conv(q_proj x)), phi(conv(k_proj x)),  v = conv(v_proj x)     (per head; the short convs optional)
    y = Scale(Q K^T (.) M) V,  out = o_proj y

M_ij is the product of the decays between tokens i and j (symmetric): 1 for LION-LIT (phi = elu + 1), sigmoid of a
learnt logit per head for LION-D, 1 - sigmoid(a_proj x + a_bias) per head and token for LION-S (both with
phi(x) = (SiLU(x) + 0.5) / ||SiLU(x) + 0.5||). Scale divides each row by its sum. It runs as the two recurrences
of baton_linear_attention.py's bidirectional_linear_attention (Baton's reference form, kernels/lion/naive.py),
whichever form (model.lion.form) Baton trained with: the forms are one function. An encoder has no decoding, so
this mixer keeps no state across calls.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baton_layers import ShortConvolution
from .baton_linear_attention import bidirectional_linear_attention, convolve

VARIANTS = {"F": "lit", "N": "d", "B": "s"}  # LION-LIT, LION-D, LION-S


def shifted_silu_features(x: torch.Tensor) -> torch.Tensor:
    """LION-D / -S's feature map over each head's dims."""
    x = F.silu(x) + 0.5
    return x / x.norm(dim=-1, keepdim=True)


class LION(nn.Module):
    def __init__(self, config, letter: str):
        super().__init__()
        baton = config.baton
        s, d = baton["lion"], baton["d_model"]
        self.variant = VARIANTS[letter]
        self.num_heads = s["num_heads"]
        self.key_dim, self.value_dim = int(d * s["expand_k"]), int(d * s["expand_v"])
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.convs = None
        if s["use_short_conv"]:
            self.convs = nn.ModuleDict({name: ShortConvolution(dim, s["conv_size"]) for name, dim in
                                        (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))})
        if self.variant == "d":
            self.decay_logit = nn.Parameter(torch.zeros(self.num_heads))
        elif self.variant == "s":
            self.a_proj = nn.Linear(d, self.num_heads, bias=False)
            self.a_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        if state is not None:
            raise ValueError("LION is an encoder's mixer: it sees the whole sequence at once and continues no state")
        B, T, _ = x.shape
        H = self.num_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs is not None:
            q, k, v = convolve(self.convs, {"q": q, "k": k, "v": v}, {}, {})
        q, k, v = q.view(B, T, H, -1), k.view(B, T, H, -1), v.view(B, T, H, -1)
        if self.variant == "lit":
            q, k = F.elu(q) + 1, F.elu(k) + 1
            decay = x.new_ones(B, T, H, 1, dtype=torch.float32)
        else:
            q, k = shifted_silu_features(q), shifted_silu_features(k)
            decay = self._log_decay(x).exp()[..., None]
        o = bidirectional_linear_attention(q, k, v, decay, normalize=True).to(v.dtype)
        return self.o_proj(o.reshape(B, T, -1)), {}

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """log lambda [B, T, H] fp32."""
        B, T, _ = x.shape
        if self.variant == "d":
            return F.logsigmoid(self.decay_logit.float()).expand(B, T, self.num_heads)
        return F.logsigmoid(-(self.a_proj(x).float() + self.a_bias.float()))
