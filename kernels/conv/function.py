"""The autograd of the short conv (a custom op): it saves only its input x (in x's dtype, plus the small weight,
bias, initial state and cu_seqlens) and recomputes the rest in the backward, whichever backend runs it.

Per-token bookkeeping (each token's document and position) is recomputed in the backward too: a few bytes
per token, not worth keeping.
"""
import contextlib

import torch

from kernels.backend import use_triton
from kernels.conv.causal_conv import conv_backward_torch, conv_forward_torch
from kernels.conv.documents import document_layout, final_state, initial_state_grad


def _backend(x: torch.Tensor):
    if use_triton(x):
        from kernels.conv.triton_conv import conv_backward_triton, conv_forward_triton
        return conv_forward_triton, conv_backward_triton
    return conv_forward_torch, conv_backward_torch


def _without_autocast(device: torch.device):
    """fp32 accumulation whatever the caller's autocast (the small einsums would run in bf16 under it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta tensors: no autocast to turn off


def _state(initial_state: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """The initial state as the backends take it: contiguous, None when there is none or it is empty (W=1)."""
    return initial_state.contiguous() if initial_state is not None and width > 1 else None


def conv_forward(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    """(y [B, T, D], final state or None) on either backend."""
    B, T, D = x.shape
    forward, _ = _backend(x)
    with _without_autocast(x.device):
        flat = x.reshape(B * T, D).contiguous()
        state = _state(initial_state, weight.shape[1])
        layout = document_layout(cu_seqlens, B, T, x.device)
        y = forward(flat, weight.contiguous(), bias, state, layout, activation).view(B, T, D)
        final = final_state(flat, state, layout, weight.shape[1]) if output_final_state else None
    return y, final


def conv_backward(x, weight, bias, initial_state, cu_seqlens, activation, grad_y, grad_final_state):
    """(dx, dweight, dbias or None, d initial_state or None), recomputing the forward from x."""
    B, T, D = x.shape
    width = weight.shape[1]
    if width == 1:  # no state to carry
        grad_final_state = None
    _, backward = _backend(x)
    with _without_autocast(x.device):
        layout = document_layout(cu_seqlens, B, T, x.device)
        state = _state(initial_state, width)
        final_grad = grad_final_state.contiguous() if grad_final_state is not None else None
        grad_x, grad_weight, grad_bias, head_grad = backward(
            x.reshape(B * T, D).contiguous(), weight.contiguous(), bias, state, final_grad, layout,
            activation, grad_y.reshape(B * T, D).contiguous())
        grad_state = None
        if initial_state is not None and state is None:  # W = 1: an empty state
            grad_state = torch.zeros_like(initial_state)
        elif initial_state is not None:
            grad_state = initial_state_grad(head_grad, weight.to(head_grad.dtype), final_grad, layout)
            grad_state = grad_state.to(initial_state.dtype)
    return (grad_x.view(B, T, D), grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if grad_bias is not None else None, grad_state)


# The op and its backward as torch.library custom ops: torch.compile treats each as one opaque call (it does
# not trace into the Triton launches), and eager mode runs the same ops. Ops cannot return None: an empty
# tensor stands for an absent final state, bias gradient or state gradient. Every output is contiguous (what
# the fake implementations promise the compiler).
def _forward_op(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    y, final = conv_forward(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)
    return y.contiguous(), x.new_empty(0) if final is None else final.contiguous()


def _backward_op(x, weight, bias, initial_state, cu_seqlens, activation, grad_y, grad_final_state):
    dx, dweight, dbias, dstate = conv_backward(x, weight, bias, initial_state, cu_seqlens, activation, grad_y,
                                               grad_final_state)
    return (dx.contiguous(), dweight.contiguous(), x.new_empty(0) if dbias is None else dbias.contiguous(),
            x.new_empty(0) if dstate is None else dstate.contiguous())


_conv = torch.library.custom_op(
    "baton::causal_conv1d", _forward_op, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, Tensor? cu_seqlens, str? activation, "
           "bool output_final_state) -> (Tensor, Tensor)")
_conv_backward = torch.library.custom_op(
    "baton::causal_conv1d_backward", _backward_op, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, Tensor? cu_seqlens, str? activation, "
           "Tensor grad_y, Tensor? grad_final_state) -> (Tensor, Tensor, Tensor, Tensor)")


@_conv.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    N = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = x.new_empty(N, x.shape[2], weight.shape[1] - 1) if output_final_state else x.new_empty(0)
    return x.new_empty(x.shape), final


@_conv_backward.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, activation, grad_y, grad_final_state):
    d_bias = x.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    d_state = x.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), d_bias, d_state


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, cu_seqlens, activation, _ = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)  # only x of the per-token tensors
    ctx.activation = activation


def _differentiate(ctx, grad_y, grad_final_state):
    x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_final_state is not None and grad_final_state.numel() == 0:
        grad_final_state = None
    dx, dweight, dbias, dstate = _conv_backward(x, weight, bias, initial_state, cu_seqlens, ctx.activation,
                                                grad_y.contiguous(), grad_final_state)
    return (dx, dweight, None if bias is None else dbias, None if initial_state is None else dstate, None, None,
            None)


_conv.register_autograd(_differentiate, setup_context=_setup_context)


def causal_conv1d_op(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    """The convolution through its custom op: (y, final state or None)."""
    y, final = _conv(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)
    return y, final if output_final_state else None
