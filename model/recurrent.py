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
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import causal_conv1d
from model.bidirectional import BidirectionalCore, encoder_only
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
                   cu_seqlens: Optional[torch.Tensor], sp, cache: Optional[dict],
                   **gates: torch.Tensor) -> torch.Tensor:
    """Run a recurrent core's chunked op and return o [B, T, H, V]. With a cache (a prefill), cache["recurrent"]
    holds the state [B, H, K, V] and is overwritten by the final one."""
    if isinstance(core, BidirectionalCore):  # an encoder's layer: both ways (model/bidirectional.py)
        if cache is not None:
            encoder_only("a prefill")
        return core.scan(q, k, v, scale=scale, cu_seqlens=cu_seqlens, sp=sp, **gates)
    if sp is not None:
        return sp.scan(core, q, k, v, scale=scale, **gates)
    if cache is not None:
        return recurrent_step(core.chunk, q, k, v, scale=scale, state=cache["recurrent"], **gates)
    return chunk_scan(core, q, k, v, gates, scale, cu_seqlens)


def _rows_flattened(cu_seqlens: Optional[torch.Tensor], tensors) -> list[torch.Tensor]:
    """With cu_seqlens the ops see the batch's rows as one sequence [1, B*T, ...] (every row start is in it)."""
    return list(tensors) if cu_seqlens is None else [_flatten(t) for t in tensors]


def chunk_scan(core: RecurrentCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict,
               scale: float, cu_seqlens: Optional[torch.Tensor],
               initial_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """o [B, T, H, V] of the chunked op (training): from a zero state, or from incoming_state's under sp."""
    q_, k_, v_, *gates_ = _rows_flattened(cu_seqlens, (q, k, v, *gates.values()))
    o, _ = core.chunk(q_, k_, v_, **dict(zip(gates, gates_)), scale=scale, initial_state=initial_state,
                      cu_seqlens=cu_seqlens)
    return o.view(*v.shape[:2], *o.shape[2:])


def incoming_state(core: RecurrentCore, k: torch.Tensor, v: torch.Tensor, gates: dict, sp) -> Optional[torch.Tensor]:
    """chunk_scan's initial state: none in one process; under sequence parallelism the state the earlier ranks
    leave, per segment of sp.cu_seqlens (parallel/sequence.py: the summary pass, the all_gather and the prefix
    combine)."""
    if sp is None:
        return None
    k_, v_, *gates_ = _rows_flattened(sp.cu_seqlens, (k, v, *gates.values()))
    return sp.incoming_state(core, k_, v_, dict(zip(gates, gates_)))


def chunk_scan_vjp(core: RecurrentCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict,
                   do: torch.Tensor, scale: float, cu_seqlens: Optional[torch.Tensor],
                   initial_state: Optional[torch.Tensor] = None) -> tuple[list, Optional[torch.Tensor]]:
    """chunk_scan's input gradients [dq, dk, dv, *dgates] (dq None for a core whose output ignores q) and
    d initial_state (None without one) for the output gradient do (core.chunk_vjp)."""
    inputs = (q, k, v, *gates.values())
    dq, dk, dv, dgates, d_initial = core.chunk_vjp(*_rows_flattened(cu_seqlens, (*inputs, do)), scale=scale,
                                                   cu_seqlens=cu_seqlens, initial_state=initial_state)
    return [None if grad is None else grad.view(x.shape) for grad, x in zip((dq, dk, dv, *dgates), inputs)], d_initial


def mix(core: RecurrentCore, prepare: Callable, finish: Callable, tensors: dict, out_proj: nn.Linear, *,
        scale: float, cu_seqlens: Optional[torch.Tensor], sp, cache: Optional[dict]) -> torch.Tensor:
    """A recurrent mixer from its input projections on: (q, k, v, gates, extras) = prepare(tensors, cu_seqlens,
    sp, cache) (short convs, norms, gates), o = the scan, out_proj(finish(o, extras, tensors)) (the output norm
    and gate). `tensors` holds the projections and the parameters prepare and finish use (explicitly, so their
    gradients can be returned).

    In training (gradients on, no cache; in one process or under sequence parallelism) the backward recomputes
    prepare and finish instead of keeping their intermediates (_ScanWithRecomputation); otherwise plain autograd."""
    if torch.is_grad_enabled() and cache is None and core.chunk_vjp is not None:
        return _ScanWithRecomputation.apply(core, partial(prepare, cu_seqlens=cu_seqlens, sp=sp, cache=None),
                                            finish, tuple(tensors), scale,
                                            cu_seqlens if sp is None else sp.cu_seqlens, sp, out_proj.weight,
                                            *tensors.values())
    q, k, v, gates, extras = prepare(tensors, cu_seqlens=cu_seqlens, sp=sp, cache=cache)
    o = recurrent_scan(core, q, k, v, scale=scale, cu_seqlens=cu_seqlens, sp=sp, cache=cache, **gates)
    return out_proj(finish(o, extras, tensors))


def output_gate(t: dict) -> torch.Tensor:
    """A mixer's output gate: in training recomputed from the mixer's input t["x"] (which its projections keep
    for their backward anyway) by t["gate_weight"], so nothing of the gate's own is kept; in decoding as given."""
    return t["gate"] if "gate" in t else F.linear(t["x"], t["gate_weight"])


class _ScanWithRecomputation(torch.autograd.Function):
    """out = finish(scan(prepare(tensors)), tensors) @ out_weight.T keeping for the backward only the tensors
    (projections: bf16 under autocast), the scan's output o and out_weight. What prepare and finish would keep
    (the short convs' inputs and outputs, fp32 norms and gates, the output gate, the gated norm's output) is
    several times that; their recomputation is token-local work, a few conv taps and the output gate's matmul
    (output_gate). The scan itself is never run again: its
    backward alone (core.chunk_vjp) turns d o into the gradients of its inputs. The output projection's
    gradients are two matmuls here, so its forward is not recomputed either.

    Under sequence parallelism (sp) the scan runs from the state the earlier ranks leave (incoming_state); the
    backward recomputes that state too (the summary pass, and the all_gather of the summaries a second time:
    O(H K V) per row, independent of T, as is the state itself) so that d initial_state, from the scan's
    backward, reaches k, v, the gates and, through the all_gather's backward, the earlier ranks. prepare's
    short convs exchange their halos again. Every rank runs the same collectives in the same order."""

    @staticmethod
    def forward(ctx, core, prepare, finish, names, scale, cu_seqlens, sp, out_weight, *values):
        tensors = dict(zip(names, values))
        q, k, v, gates, extras = prepare(tensors)
        o = chunk_scan(core, q, k, v, gates, scale, cu_seqlens, incoming_state(core, k, v, gates, sp))
        y = finish(o, extras, tensors)
        ctx.save_for_backward(o, out_weight, *values)
        ctx.core, ctx.prepare, ctx.finish, ctx.names, ctx.scale, ctx.cu_seqlens, ctx.sp = (
            core, prepare, finish, names, scale, cu_seqlens, sp)
        device = o.device.type  # the backward recomputes under the forward's autocast
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                            enabled=torch.is_autocast_enabled(device))
        return F.linear(y, out_weight.to(y.dtype))

    @staticmethod
    def backward(ctx, d_out):
        o, out_weight, *values = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(needed) for x, needed in zip(values, ctx.needs_input_grad[8:])]
        o = o.detach().requires_grad_()
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            q, k, v, gates, extras = ctx.prepare(dict(zip(ctx.names, leaves)))
            y = ctx.finish(o, extras, dict(zip(ctx.names, leaves)))
            initial_state = incoming_state(ctx.core, k, v, gates, ctx.sp)
        d_y = d_out @ out_weight.to(d_out.dtype)
        d_out_weight = (d_out.flatten(0, -2).T @ y.detach().flatten(0, -2)).to(out_weight.dtype)
        (d_o,) = torch.autograd.grad(y, o, d_y, retain_graph=True)
        scan_inputs = (q, k, v, *gates.values())
        d_scan, d_initial = chunk_scan_vjp(
            ctx.core, q.detach(), k.detach(), v.detach(), {name: gate.detach() for name, gate in gates.items()}, d_o,
            ctx.scale, ctx.cu_seqlens, None if initial_state is None else initial_state.detach())
        roots = [(y, d_y), (initial_state, d_initial)] + list(zip(scan_inputs, d_scan))
        roots = [(x, dx) for x, dx in roots if x is not None and dx is not None and x.requires_grad]
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad([r for r, _ in roots], wanted, [g for _, g in roots], allow_unused=True)
                     if wanted else ())
        return (None, None, None, None, None, None, None, d_out_weight if ctx.needs_input_grad[7] else None,
                *(next(grads) if x.requires_grad else None for x in leaves))


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
                cache: Optional[dict] = None, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """weight and bias: the parameters as a caller that recomputes this conv holds them (mix), else its own."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if sp is not None:
            return sp.conv(x, weight, bias, self.activation)
        if cache is not None:
            return self.step(x, cache[self.cache_key])
        if cu_seqlens is None:
            return causal_conv1d(x, weight, bias, self.activation)[0]
        y, _ = causal_conv1d(_flatten(x), weight, bias, self.activation, cu_seqlens=cu_seqlens)
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
