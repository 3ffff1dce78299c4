"""The Liger mixer of an exported Baton model (letter Z, model/liger.py), following baton_layers.py's interface: an
attention layer's projections (q_proj, k_proj, v_proj, o_proj, the q/k norms; GQA, biases, RoPE and its scaling)
computing

    recurrent branch: S_t = diag(a_t) S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t), phi = softmax over the head
        dimension, log a_t from the keys alone: logsigmoid(k_t) / normalizer per channel (gate "gla") or
        -softplus(mean k_t) / normalizer per head ("scalar"); each KV head serves its group of query heads
    window branch: softmax attention of the rotated queries over the last `window` keys, the query's own included
    o = mix * recurrent + (1 - mix) * window, then o_proj.

State: {"recurrent": S [B, H, D, D] fp32, "k", "v": the window's last window - 1 rotated keys and values,
"length": the tokens seen}: constant in the context.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baton_layers import RMSNorm, apply_rotary, rope_frequencies
from .baton_linear_attention import linear_recurrence


class Liger(nn.Module):
    def __init__(self, config):
        super().__init__()
        baton = config.baton
        a, settings, d = baton["attention"], baton["liger"], baton["d_model"]
        self.num_heads = a["num_heads"]
        self.num_kv_heads = a["num_kv_heads"] or a["num_heads"]
        self.head_dim = a["head_dim"] or d // a["num_heads"]
        self.groups = self.num_heads // self.num_kv_heads
        self.rope_theta, self.rope_scaling = a["rope_theta"], a.get("rope_scaling")
        self.window, self.mix, self.gate = settings["window"], settings["mix"], settings["gate"]
        self.gate_logit_normalizer = settings["gate_logit_normalizer"]
        qkv_bias = a.get("qkv_bias", False)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=a.get("out_bias", False))
        self.q_norm = RMSNorm(self.head_dim, baton["norm_eps"]) if a.get("qk_norm", False) else None
        self.k_norm = RMSNorm(self.head_dim, baton["norm_eps"]) if a.get("qk_norm", False) else None

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        state = state or {}
        B, T, _ = x.shape
        H, D, G = self.num_heads, self.head_dim, self.groups
        start = state.get("length", 0)
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        # the recurrent branch: softmax feature maps, the gate from the keys alone
        if self.gate == "gla":
            log_decay = F.logsigmoid(k.float())
        else:
            log_decay = -F.softplus(k.float().mean(-1, keepdim=True))
        decay = (log_decay / self.gate_logit_normalizer).exp().repeat_interleave(G, 2)
        phi_q = torch.softmax(q.float(), -1).to(v.dtype)
        phi_k = torch.softmax(k.float(), -1).to(v.dtype).repeat_interleave(G, 2)
        recurrent, memory = linear_recurrence(phi_q, phi_k, v.repeat_interleave(G, 2), decay, state.get("recurrent"))

        # the window branch: RoPE, the last window - 1 keys before these and these
        positions = start + torch.arange(T, device=x.device)
        inv_freq = rope_frequencies(D, self.rope_theta, self.rope_scaling, x.device)
        q, k = apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq)
        if "k" in state:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        key_positions = torch.arange(start + T - k.shape[1], start + T, device=x.device)
        visible = ((key_positions[None, :] <= positions[:, None])
                   & (key_positions[None, :] > positions[:, None] - self.window))
        window = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(G, 1),
                                                v.transpose(1, 2).repeat_interleave(G, 1), attn_mask=visible)
        window = window.transpose(1, 2)
        kept = min(self.window - 1, k.shape[1])
        new_state = {"recurrent": memory, "k": k[:, k.shape[1] - kept:], "v": v[:, v.shape[1] - kept:],
                     "length": start + T}
        o = self.mix * recurrent.to(window.dtype) + (1 - self.mix) * window
        return self.o_proj(o.reshape(B, T, -1)), new_state
