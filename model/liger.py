"""Liger (Lan et al. 2025, arXiv:2503.01496): a pretrained Transformer's attention turned into a gated linear
recurrence mixed with sliding-window attention, with no new parameters (letter Z, settings `model.liger`).

A Liger layer is an attention layer (model/attention.py: the same q_proj, k_proj, v_proj, o_proj and q/k norms,
GQA, biases, RoPE and its scaling), so linearizing a Transformer is a weight copy. From the teacher's projections
q, k [.., D] and v of each token (q and k after the q/k norms when the model has them, before RoPE):

    recurrent branch (GRM): S_t = diag(a_t) S_{t-1} + phi(k_t) v_t^T,  o_t = S_t^T phi(q_t)
        phi = softmax over the head dimension (the feature map), a_t from the keys alone:
        gate=gla     log a_t = logsigmoid(k_t) / normalizer, one decay per key channel (the released code's)
        gate=scalar  log a_t = -softplus(mean(k_t)) / normalizer, one per head (Mamba2-style)
    window branch (SWA): softmax attention of the rotated q, k over the last `window` tokens (the query included)
    o = mix * GRM + (1 - mix) * SWA, then o_proj.

Grouped-query heads: each KV head's key, gate and value serve its query heads (the state is per query head,
H x D x D). The recurrent branch is Baton's GLA core (kernels: chunk_gla, fused_recurrent_gla, the state summary)
through model/recurrent.py's state contract, the window branch Attention's own code; so packed documents,
sequence parallelism (sp.scan + the window's halo) and decoding (the recurrent state + a ring of `window` keys in
the preallocated decode state, no host sync) are theirs. Liger-H keeps some layers as full attention (the
pattern; `init.keep_attention_every`).

`init.linearize=liger` makes a run's model the teacher's with A layers turned into Z layers (`linearized_pattern`,
called by checkpoints/initial.py's `linearize_model_config`); `teacher_mode(model)` runs a model as that teacher: Z
layers as full attention, LoRA updates off (model/lora.py), for the distillation loss (`train.distill`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from model.attention import Attention
from model.config import ModelConfig
from model.flops import attention_flops, chunked_recurrence_flops
from model.gla import GLA_CORE  # a [K] log decay per head and step
from model.lora import LoRALinear
from model.mamba2 import MAMBA2_CORE  # one per head
from model.recurrent import recurrent_scan, recurrent_step
from model.registry import Mixer, register


class Liger(Attention):
    """Liger attention: the attention layer's parameters, a gated recurrent branch and a window branch."""

    def __init__(self, cfg: ModelConfig):
        cfg.attention.check(cfg.d_model)  # the settings it shares with attention (the pattern may have no A)
        settings = cfg.liger
        self.teacher = False
        super().__init__(cfg, window=settings.window)
        self.gate, self.mix, self.gate_logit_normalizer = settings.gate, settings.mix, settings.gate_logit_normalizer
        self.core = GLA_CORE if settings.gate == "gla" else MAMBA2_CORE
        self.groups = self.num_heads // self.num_kv_heads

    # The window branch's keys; in teacher mode the teacher's full attention (None) through Attention's code.
    @property
    def window(self) -> Optional[int]:
        return None if self.teacher else self._window

    @window.setter
    def window(self, value: Optional[int]) -> None:
        self._window = value

    def log_decay(self, k: torch.Tensor) -> torch.Tensor:
        """The recurrent branch's log decay from the keys k [..., H_kv, D] alone, per query head: [..., H, D]
        (gla) or [..., H] (scalar), fp32 and <= 0."""
        k = k.float()
        if self.gate == "gla":
            g = F.logsigmoid(k)
        else:
            g = -F.softplus(k.mean(-1))
        return (g / self.gate_logit_normalizer).repeat_interleave(self.groups, dim=k.dim() - 2)

    def _recurrent_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q [.., H, D], k, v [.., H_kv, D] -> the scan's feature-mapped q, k and v per query head, and its gate."""
        dtype = v.dtype
        phi_q = torch.softmax(q.float(), -1).to(dtype)
        phi_k = torch.softmax(k.float(), -1).to(dtype).repeat_interleave(self.groups, dim=-2)
        return phi_q, phi_k, v.repeat_interleave(self.groups, dim=-2), self.log_decay(k)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        if self.teacher:
            return super().forward(x, cu_seqlens, sp, cache)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self._norm_heads(q, k)
        phi_q, phi_k, values, g = self._recurrent_inputs(q, k, v)
        recurrent = recurrent_scan(self.core, phi_q, phi_k, values, scale=1.0, cu_seqlens=cu_seqlens, sp=sp,
                                   cache=cache, g=g)
        window = self._attend(q, k, v, cu_seqlens, sp, cache)
        return self.o_proj(self._mix(recurrent.reshape(B, T, -1), window))

    def _mix(self, recurrent: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        return self.mix * recurrent.to(window.dtype) + (1 - self.mix) * window

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: the recurrent state advanced in place (fused recurrent kernel), the key and value
        written into the window's ring, both branches mixed. No host sync, the same operations at every context."""
        B = x.shape[0]
        qk = self._decode_qk(x)
        v = self.v_proj(x)
        q, k = qk.split((self.num_heads, self.num_kv_heads), 1)
        phi_q, phi_k, values, g = self._recurrent_inputs(q, k, v.view(B, self.num_kv_heads, self.head_dim))
        recurrent = recurrent_step(self.core.decode, phi_q[:, None], phi_k[:, None], values[:, None], g=g[:, None],
                                   scale=1.0, state=cache["recurrent"])
        window = self._decode_attend(qk, v, cache, positions)
        return self.o_proj(self._mix(recurrent.reshape(B, -1), window).to(x.dtype))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The window's ring of min(window, max_len) keys and values (Attention's) and the recurrent state
        [B, H, D, D] fp32: neither grows with the context beyond the window."""
        if self.teacher:
            raise RuntimeError("a Liger layer in teacher mode does not decode")
        cache = super().init_cache(batch_size, max_len)
        cache["recurrent"] = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim,
                                         device=self.q_proj.weight.device, dtype=torch.float32)
        return cache


@contextlib.contextmanager
def teacher_mode(model: torch.nn.Module):
    """Run `model` as the Transformer it was linearized from: Liger layers as full attention on their (frozen)
    projections, every LoRA update off. With LoRA the base weights never change, so this is the teacher exactly."""
    switched = [m for m in model.modules() if isinstance(m, (Liger, LoRALinear))]
    for module in switched:
        module.teacher = True
    try:
        yield model
    finally:
        for module in switched:
            module.teacher = False


def linearized_pattern(letters: list[str], keep_attention_every: Optional[int]) -> str:
    """The teacher's layer letters (one per layer) with every full-attention layer (A) a Liger layer (Z), but
    layers N-1, 2N-1, ... (0-based) kept as attention when keep_attention_every = N (Liger-H: one attention layer
    after every N - 1 Liger layers)."""
    keep = keep_attention_every or 0
    out = []
    for i, letter in enumerate(letters):
        kept = keep and i % keep == keep - 1
        out.append("Z" if letter == "A" and not kept else letter)
    return "".join(out)


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    a = cfg.attention
    d = a.head_dim or cfg.d_model // a.num_heads
    return d, d


register(Mixer("liger", "Z", config_key="liger", build=Liger, core=GLA_CORE, head_dims=_head_dims,
               flops=lambda m, seq_len: attention_flops(m, seq_len)
               + chunked_recurrence_flops(m.num_heads, m.head_dim, m.head_dim)))
