"""The mLSTM layer of xLSTM (Beck et al. 2024), as xLSTM 7B builds it (Beck et al. 2025, "xLSTM 7B: A
Recurrent LLM for Fast and Efficient Inference"): a pre-norm block's mixer, the MLP being the block's own.

    q, k, v = W_q x, W_k x, W_v x                       per head: K = expand_qk d / H, V = expand_v d / H
    i~, f~ = cap tanh((W_if x + b_if) / cap)           the gates' pre-activations, soft-capped (cap = 15)
    h = mLSTM(q, k, v, i = i~, f = logsigmoid(f~))     exponential input gate, sigmoid forget gate,
                                                        normaliser and max-stabiliser (kernels/mlstm)
    out = W_o (RMSNorm_head(h) * silu(W_g x))

The input gate's bias starts at -10 and the forget gates' uniform in [3, 6] (xLSTM 7B: -10, 3..6). The output
gate is the gated norm the GLA and Gated DeltaNet mixers share (SiLU; xLSTM 7B's is a sigmoid). There is no
short convolution (xLSTM 7B dropped it). The state per head is (C, n, m), [K, V+2] (kernels/mlstm/state.py).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import chunk_mlstm, chunk_mlstm_vjp, combine_mlstm_states, fused_recurrent_mlstm, mlstm_state_summary
from model.config import ModelConfig
from model.flops import chunked_recurrence_flops
from model.layers import GatedRMSNorm
from model.recurrent import mix, output_gate, recurrent_step
from model.registry import Mixer, RecurrentCore, register

# GLA's scalar-gate kernels underneath (kernels/mlstm/gla_form.py), a decode step its own (fused_recurrent.py); the
# backward of the recomputation around the scan runs GLA's forward once more (chunk_mlstm_vjp).
MLSTM_CORE = RecurrentCore("mlstm", chunk=chunk_mlstm, chunk_vjp=chunk_mlstm_vjp, decode=fused_recurrent_mlstm,
                           state_summary=mlstm_state_summary, combine=combine_mlstm_states)


class MLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.mlstm
        d = cfg.d_model
        self.num_heads = s.num_heads
        self.key_dim, self.value_dim = int(d * s.expand_qk), int(d * s.expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // s.num_heads, self.value_dim // s.num_heads
        self.gate_soft_cap = s.gate_soft_cap
        self.input_gate_init, self.forget_gate_init = s.input_gate_bias, (s.forget_gate_bias_min,
                                                                          s.forget_gate_bias_max)
        self.core = MLSTM_CORE
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.if_proj = nn.Linear(d, 2 * s.num_heads, bias=False)  # input then forget gate, per head
        # the gates' biases, parameters of their own: the init sets them (a Linear's bias would start at zero)
        self.input_gate_bias = nn.Parameter(torch.empty(s.num_heads))
        self.forget_gate_bias = nn.Parameter(torch.empty(s.num_heads))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.g_norm = GatedRMSNorm(self.head_v_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """The gates' biases: input gate -10, forget gates uniform in [3, 6] over the heads (xLSTM 7B spaces them
        evenly; a draw is what sharded parameters can be filled with in place, parallel/materialize.py)."""
        with torch.no_grad():
            self.input_gate_bias.fill_(self.input_gate_init)
            self.forget_gate_bias.uniform_(*self.forget_gate_init)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        tensors = dict(q=self.q_proj(x), k=self.k_proj(x), v=self.v_proj(x), gates=self.if_proj(x),
                       input_bias=self.input_gate_bias, forget_bias=self.forget_gate_bias, x=x,
                       gate_weight=self.g_proj.weight, norm=self.g_norm.weight)
        return mix(self.core, self._scan_inputs, self._output, tensors, self.o_proj,
                   scale=self.head_k_dim ** -0.5, cu_seqlens=cu_seqlens, sp=sp, cache=cache)

    def _scan_inputs(self, t: dict, cu_seqlens, sp, cache):
        """The projections -> q, k [B, T, H, K], v [B, T, H, V] and the gates' logs i, f [B, T, H] (fp32)."""
        B, T, H = *t["q"].shape[:2], self.num_heads
        return (t["q"].view(B, T, H, self.head_k_dim), t["k"].view(B, T, H, self.head_k_dim),
                t["v"].view(B, T, H, self.head_v_dim),
                self._gates(t["gates"], t["input_bias"], t["forget_bias"]), {})

    def _gates(self, logits: torch.Tensor, input_bias: torch.Tensor, forget_bias: torch.Tensor) -> dict:
        cap = self.gate_soft_cap
        bias = torch.cat([input_bias, forget_bias]).float()
        i, f = (cap * torch.tanh((logits.float() + bias) / cap)).chunk(2, -1)
        return {"i": i, "f": F.logsigmoid(f)}

    def _output(self, o: torch.Tensor, extras: dict, t: dict) -> torch.Tensor:
        """h [..., H, V] -> the normed and gated output [..., value_dim], before o_proj."""
        return self.g_norm(o, output_gate(t).view(o.shape), weight=t["norm"]).flatten(-2)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the state advanced in place."""
        B, H = x.shape[0], self.num_heads
        q, k = (proj(x).view(B, 1, H, self.head_k_dim) for proj in (self.q_proj, self.k_proj))
        gates = {name: gate[:, None] for name, gate in self._gates(self.if_proj(x), self.input_gate_bias,
                                                                           self.forget_gate_bias).items()}
        o = recurrent_step(self.core.decode, q, k, self.v_proj(x).view(B, 1, H, self.head_v_dim), **gates,
                           scale=self.head_k_dim ** -0.5, state=cache["recurrent"])
        return self.o_proj(self._output(o[:, 0], {}, {"norm": self.g_norm.weight, "gate": self.g_proj(x)}))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The state (C | n | m) [B, H, K, V+2] fp32, empty (independent of max_len)."""
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim + 2,
                                         device=self.q_proj.weight.device, dtype=torch.float32)}


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    s = cfg.mlstm
    return int(cfg.d_model * s.expand_qk) // s.num_heads, int(cfg.d_model * s.expand_v) // s.num_heads + 2


# GLA's chunked recurrence over V + 1 value columns (the normaliser's is the extra one).
register(Mixer("mlstm", "X", config_key="mlstm", build=MLSTM, core=MLSTM_CORE, head_dims=_head_dims,
               flops=lambda m, seq_len: chunked_recurrence_flops(m.num_heads, m.head_k_dim, m.head_v_dim + 1)))
