"""How recurrent mixers call the kernels: one place for the state contract's three modes.

A recurrent op (and the short conv) runs in exactly one of these modes per call:
- training: `op(..., cu_seqlens=...)` on the batch flattened to [1, B*T] (cu_seqlens contains every row
  start, so rows and packed documents all restart the state), or on [B, T] without cu_seqlens;
- sequence parallel: the `sp` context's scan / conv (parallel/sequence.py), which threads states across ranks;
- generation: the cached state is the initial state and the final state is written over it in place (the
  state is preallocated once per generation); a prompt uses the chunked kernel, a decode step (one token per
  row, the mixers' `decode`) the fused recurrent one.
"""
import math
from typing import Callable, Optional

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
    """Run a recurrent core's chunked op and return o [B, T, H, V]. With a cache (a prefill), cache["recurrent"]
    holds the state [B, H, K, V] and is overwritten by the final one."""
    chunk_op = core.chunk
    if sp is not None:
        return sp.scan(core, q, k, v, scale=scale, **gates)
    if cache is not None:
        return recurrent_step(chunk_op, q, k, v, scale=scale, state=cache["recurrent"], **gates)
    if cu_seqlens is None:
        return chunk_op(q, k, v, **gates, scale=scale)[0]
    B, T = q.shape[:2]
    flat_gates = {name: _flatten(gate) for name, gate in gates.items()}
    o, _ = chunk_op(_flatten(q), _flatten(k), _flatten(v), **flat_gates, scale=scale, cu_seqlens=cu_seqlens)
    return o.view(B, T, *o.shape[2:])


def recurrent_step(op: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   state: torch.Tensor, **gates: torch.Tensor) -> torch.Tensor:
    """Advance a preallocated state [B, H, K, V] in place by op (chunked for a prompt, fused recurrent for
    one token) and return o [B, T, H, V]."""
    o, final = op(q, k, v, **gates, scale=scale, initial_state=state, output_final_state=True)
    state.copy_(final)
    return o


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
            return self.step(x, cache[self.cache_key])
        if cu_seqlens is None:
            return causal_conv1d(x, self.weight, self.bias, self.activation)[0]
        y, _ = causal_conv1d(_flatten(x), self.weight, self.bias, self.activation, cu_seqlens=cu_seqlens)
        return y.view(x.shape)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Convolve x [B, T, D] after the window state [B, D, W-1], which is overwritten in place by the last
        W-1 inputs (a prefill, or one decode token)."""
        y, final = causal_conv1d(x, self.weight, self.bias, self.activation, initial_state=state,
                                 output_final_state=True)
        state.copy_(final)
        return y

    def init_cache(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.kernel_size - 1, device=self.weight.device,
                           dtype=self.weight.dtype)


def fused_conv_cache(convs: dict, batch_size: int) -> dict:
    """One window state [B, sum of dims, W-1] for several short convs of the same kernel size, with each
    conv's own state a view of it under its cache key: a prefill runs the convs one by one, a decode step
    all of them in one call (fused_conv_decode)."""
    convs = list(convs.values())
    state = torch.cat([conv.init_cache(batch_size) for conv in convs], 1)
    cache, start = {"fused_conv": state}, 0
    for conv in convs:  # slices, not split(): a prefill under autograd writes them in place
        cache[conv.cache_key], start = state[:, start:start + conv.dim], start + conv.dim
    return cache


def fused_conv_decode(convs: dict, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """The decode step of bias-free short convs with one activation over their concatenated inputs
    x [B, sum of dims] (one token per row), in one conv call on the fused_conv_cache state: y [B, 1, sum]."""
    convs = list(convs.values())
    weight = torch.cat([conv.weight for conv in convs])
    y, final = causal_conv1d(x[:, None], weight, None, convs[0].activation, initial_state=cache["fused_conv"],
                             output_final_state=True)
    cache["fused_conv"].copy_(final)
    return y
