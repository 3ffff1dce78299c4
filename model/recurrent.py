"""How recurrent mixers call the kernels: one place for the state contract's three modes.

A recurrent op (and the short conv) runs in exactly one of these modes per call:
- training: `op(..., cu_seqlens=...)` on the batch flattened to [1, B*T] (cu_seqlens contains every row
  start, so rows and packed documents all restart the state), or on [B, T] without cu_seqlens;
- sequence parallel: the `sp` context's scan / conv (parallel/sequence.py), which threads states across ranks;
- generation: the cached state is the initial state and the final state replaces it; a single token
  uses the fused recurrent kernel, a prompt the chunked one.
"""
import math
from typing import Optional

import torch
import torch.nn as nn

from kernels import causal_conv1d
from model.registry import RecurrentCore


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


def init_dt_bias_(dt_bias: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Mamba2's step-size init, in place (so also on sharded parameters after a meta-device build): dt
    log-uniform in [dt_min, dt_max], floored, stored as the bias whose softplus is dt."""
    with torch.no_grad():
        dt_bias.uniform_().mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_()
        dt_bias.clamp_(min=dt_init_floor)
        dt_bias.add_(torch.log(-torch.expm1(-dt_bias)))  # softplus^-1(dt) = dt + log(1 - exp(-dt))


def recurrent_scan(core: RecurrentCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   cu_seqlens: Optional[torch.Tensor], sp, cache: Optional[dict], **gates: torch.Tensor) -> torch.Tensor:
    """Run a recurrent core (its chunked op, or its decode op on one cached token) and return o [B, T, H, V].
    With a cache, cache["recurrent"] holds the state [B, H, K, V] and is replaced by the final state."""
    chunk_op = core.chunk
    if sp is not None:
        return sp.scan(core, q, k, v, scale=scale, **gates)
    if cache is not None:
        op = core.decode if q.shape[1] == 1 else chunk_op
        o, cache["recurrent"] = op(q, k, v, **gates, scale=scale, initial_state=cache["recurrent"],
                                   output_final_state=True)
        return o
    if cu_seqlens is None:
        return chunk_op(q, k, v, **gates, scale=scale)[0]
    B, T = q.shape[:2]
    flat_gates = {name: _flatten(gate) for name, gate in gates.items()}
    o, _ = chunk_op(_flatten(q), _flatten(k), _flatten(v), **flat_gates, scale=scale, cu_seqlens=cu_seqlens)
    return o.view(B, T, *o.shape[2:])


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time (kernel size W) with its own W-1 token state for decoding."""

    def __init__(self, dim: int, kernel_size: int, bias: bool = False, activation: Optional[str] = "silu",
                 cache_key: str = "conv"):
        super().__init__()
        self.activation = activation
        self.cache_key = cache_key
        self.dim, self.kernel_size = dim, kernel_size  # the weight's shape, hidden when ZeRO-3 partitions it
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default for a depthwise conv: fan_in = kernel_size.
        bound = 1 / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        if sp is not None:
            return sp.conv(x, self.weight, self.bias, self.activation)
        if cache is not None:
            y, cache[self.cache_key] = causal_conv1d(x, self.weight, self.bias, self.activation,
                                                     initial_state=cache[self.cache_key],
                                                     output_final_state=True)
            return y
        if cu_seqlens is None:
            return causal_conv1d(x, self.weight, self.bias, self.activation)[0]
        y, _ = causal_conv1d(_flatten(x), self.weight, self.bias, self.activation, cu_seqlens=cu_seqlens)
        return y.view(x.shape)

    def init_cache(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.kernel_size - 1, device=self.weight.device,
                           dtype=self.weight.dtype)
