"""LION (Afzal et al. 2025, arXiv:2502.16249): bidirectional linear attention, an encoder's token mixer.

    q, k = phi(conv(W_q x)), phi(conv(W_k x)),  v = conv(W_v x)      (per head; the causal short conv is optional)
    y = Scale(Q K^T (.) M) V,  out = W_o y                             (kernels/lion: full, chunk or rnn form)

Three masks (letters): LION-LIT (F, the paper's "LION-fire": M = 1, phi = elu + 1, the Linear Transformer made
bidirectional), LION-D (N: lambda = sigmoid(a) per head, learnt, the same at every token: RetNet's decay) and LION-S
(B: lambda_i = 1 - sigmoid(w . x_i + b) per head and token: selective, as Mamba2's). LION-D and -S use
phi(x) = (SiLU(x) + 0.5) / ||SiLU(x) + 0.5||. M_ij multiplies the decays between tokens i and j (kernels/lion/
full.py pins the convention), so it is symmetric: with the short convolution (on by default, model.lion.
use_short_conv) the layer also tells which side a token is on. Settings: model.lion (model/config.py LIONConfig).
"""
import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.backend import use_triton
from model.bidirectional import BidirectionalCore, encoder_only
from model.config import ModelConfig
from model.flops import chunked_recurrence_flops
from model.gla import GLA_CORE
from model.recurrent import ShortConvolution
from model.registry import Mixer, register


def shifted_silu_features(x: torch.Tensor) -> torch.Tensor:
    """LION-D / -S's feature map: (SiLU(x) + 0.5) / ||SiLU(x) + 0.5|| over each head's dims (positive: SiLU >= -0.28)."""
    x = F.silu(x) + 0.5
    return x / x.norm(dim=-1, keepdim=True)


class LION(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: str):
        super().__init__()
        s = cfg.lion
        d = cfg.d_model
        self.variant = variant
        self.num_heads = s.num_heads
        self.key_dim, self.value_dim = int(d * s.expand_k), int(d * s.expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // s.num_heads, self.value_dim // s.num_heads
        self.decay_min, self.decay_max = s.decay_min, s.decay_max
        self.core = BidirectionalCore(GLA_CORE, s.form, normalize=True, recompute=False)  # forward() recomputes
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.convs = None
        if s.use_short_conv:
            self.convs = nn.ModuleDict({name: ShortConvolution(dim, s.conv_size, cache_key=f"{name}_conv")
                                        for name, dim in (("q", self.key_dim), ("k", self.key_dim),
                                                          ("v", self.value_dim))})
        if variant == "d":  # lambda = sigmoid(decay_logit), one per head
            self.decay_logit = nn.Parameter(torch.empty(s.num_heads))
        elif variant == "s":  # lambda_i = 1 - sigmoid(a_proj(x_i) + a_bias), per head and token
            self.a_proj = nn.Linear(d, s.num_heads, bias=False)
            self.a_bias = nn.Parameter(torch.empty(s.num_heads))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Per-head decays with 1 - lambda log-uniform in [1 - decay_max, 1 - decay_min] (a spread of memories, as
        Mamba2's step sizes); in place only, so also on sharded parameters after a meta-device build."""
        if self.variant == "lit":
            return
        param = self.decay_logit if self.variant == "d" else self.a_bias
        low, high = math.log(1 - self.decay_max), math.log(1 - self.decay_min)
        with torch.no_grad():
            log_forget = param.uniform_().mul_(high - low).add_(low)  # log(1 - lambda)
            log_lambda = torch.log(-torch.expm1(log_forget))
            # LION-D: sigmoid(logit) = lambda; LION-S: 1 - sigmoid(bias) = lambda at a zero projection
            param.copy_(log_lambda - log_forget if self.variant == "d" else log_forget - log_lambda)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        if cache is not None:
            encoder_only("a prefill")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        mix = partial(self._mix, cu_seqlens=cu_seqlens, sp=sp)
        if torch.is_grad_enabled() and sp is None and not use_triton(x):
            # The PyTorch path keeps for the backward only the projections (and x, which they keep anyway): the short
            # convs, feature maps, decays and both scans run again there, as attention's CPU path recomputes its
            # blocks. (Triton's scan keeps only its inputs; under sp the collectives are not run twice.)
            o = checkpoint(mix, x, q, k, v, use_reentrant=False)
        else:
            o = mix(x, q, k, v)
        return self.o_proj(o)

    def _mix(self, x, q, k, v, cu_seqlens, sp) -> torch.Tensor:
        """The projections -> LION's output [B, T, value_dim], before o_proj."""
        B, T, _ = x.shape
        H = self.num_heads
        if self.convs is not None:
            q, k, v = (self.convs[name](t, cu_seqlens, sp) for name, t in zip("qkv", (q, k, v)))
        q, k, v = q.view(B, T, H, -1), k.view(B, T, H, -1), v.view(B, T, H, -1)
        if self.variant == "lit":
            q, k, g = F.elu(q) + 1, F.elu(k) + 1, None
        else:
            q, k = shifted_silu_features(q), shifted_silu_features(k)
            g = self._log_decay(x)
        return self.core.scan(q, k, v, scale=1.0, cu_seqlens=cu_seqlens, sp=sp, g=g).reshape(B, T, -1)

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """log lambda [B, T, H] in fp32 (fp64 in an fp64 model)."""
        B, T, _ = x.shape
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.variant == "d":
            return F.logsigmoid(self.decay_logit.to(dtype)).expand(B, T, self.num_heads)
        return F.logsigmoid(-(self.a_proj(x).to(dtype) + self.a_bias.to(dtype)))  # log(1 - sigmoid(a))

    def decode(self, x, cache, positions):
        encoder_only("a decode step")

    def init_cache(self, batch_size: int, max_len: int):
        encoder_only("init_state")


def _flops(module: LION, seq_len: int) -> float:
    """Both directions of the chunked recurrence with the normaliser column (the chunk form's count)."""
    return 2 * chunked_recurrence_flops(module.num_heads, module.head_k_dim, module.head_v_dim + 1)


for _name, _letter, _variant in (("lion_lit", "F", "lit"), ("lion_d", "N", "d"), ("lion_s", "B", "s")):
    register(Mixer(_name, _letter, config_key="lion", build=partial(LION, variant=_variant), flops=_flops,
                   bidirectional="always"))
