"""FLOPs per token, for MFU: every projection's matmul plus each mixer's sequence mixing.

Forward FLOPs per token =
    2 * (weights of every nn.Linear, the output head included even when tied) + 2 * D * W per short conv
  + attention: 4 * heads * head_dim * (mean number of keys a query sees: (T + 1) / 2 causal, capped by the window)
  + chunked recurrence (chunk C, per head with key dim K and value dim V), as the chunk kernels compute it:
      2 C (K + V)   intra-chunk scores q k^T and scores @ v (full C x C blocks)
      4 K V         the query against the incoming state, and the chunk's contribution to the next state
    and for the delta rule additionally the WY representation:
      2 C K (k k^T) + 2 C K (W) + 2 C V (U) + 2 K V (W S) + C^2 / 3 (the triangular solve).
Training FLOPs per token = 3 x forward (the backward costs two forwards).
"""
from typing import Optional

import torch.nn as nn

from kernels.common import CHUNK_SIZE
from model.recurrent import ShortConvolution
from model.registry import MIXERS


def mean_context(seq_len: int, window: Optional[int]) -> float:
    """Mean number of keys a causal query attends to over positions 0..seq_len-1."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def chunked_recurrence_flops(num_heads: int, k_dim: int, v_dim: int, delta_rule: bool = False) -> float:
    C, K, V = CHUNK_SIZE, k_dim, v_dim
    flops = 2 * C * (K + V) + 4 * K * V
    if delta_rule:
        flops += 4 * C * K + 2 * C * V + 2 * K * V + C * C / 3
    return num_heads * flops


def attention_flops(mixer: nn.Module, seq_len: int) -> float:
    """q k^T and scores @ v over the keys a query sees (full or windowed; an encoder's: all of them)."""
    keys = mean_context(seq_len, mixer.window) if getattr(mixer, "causal", True) else seq_len
    return 4 * mixer.num_heads * mixer.head_dim * keys


def projection_flops_per_token(model: nn.Module) -> float:
    """2 FLOPs per weight of every matmul and depthwise conv (a tied head counts: it is a matmul)."""
    flops = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
        elif isinstance(module, ShortConvolution):
            flops += 2 * module.weight.numel()
    return flops


def mixing_flops_per_token(lm: nn.Module, seq_len: int) -> list[float]:
    """Each layer's forward mixing FLOPs per token, by the formula its mixer registered (model/registry.py)."""
    return [MIXERS[name].flops(block.mixer, seq_len)
            for name, block in zip(lm.config.layer_mixers(), lm.blocks, strict=True)]


def forward_flops_per_token(lm: nn.Module, seq_len: int) -> float:
    return projection_flops_per_token(lm) + sum(mixing_flops_per_token(lm, seq_len))
