"""The autograd Function of the short conv: it saves only its input x (in x's dtype, plus the small weight,
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


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
        B, T, D = x.shape
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
        ctx.activation = activation
        forward, _ = _backend(x)
        with _without_autocast(x.device):
            flat = x.reshape(B * T, D).contiguous()
            state = _state(initial_state, weight.shape[1])
            layout = document_layout(cu_seqlens, B, T, x.device)
            y = forward(flat, weight.contiguous(), bias, state, layout, activation).view(B, T, D)
            final = final_state(flat, state, layout, weight.shape[1]) if output_final_state else None
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final_state):
        x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
        B, T, D = x.shape
        width = weight.shape[1]
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if width == 1:  # no state to carry
            grad_final_state = None
        _, backward = _backend(x)
        with _without_autocast(x.device):
            layout = document_layout(cu_seqlens, B, T, x.device)
            state = _state(initial_state, width)
            final_grad = grad_final_state.contiguous() if grad_final_state is not None else None
            grad_x, grad_weight, grad_bias, head_grad = backward(
                x.reshape(B * T, D).contiguous(), weight.contiguous(), bias, state, final_grad, layout,
                ctx.activation, grad_y.reshape(B * T, D).contiguous())
            grad_state = None
            if state is None and ctx.needs_input_grad[3]:  # W = 1: an empty state
                grad_state = torch.zeros_like(initial_state)
            elif ctx.needs_input_grad[3]:
                grad_state = initial_state_grad(head_grad, weight.to(head_grad.dtype), final_grad, layout)
                grad_state = grad_state.to(initial_state.dtype)
        return (grad_x.view(B, T, D), grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype) if grad_bias is not None else None, grad_state, None, None, None)
