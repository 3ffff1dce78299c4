"""Causal depthwise conv1d in PyTorch, forward and backward (the CPU path): W shifted multiply-adds over the
whole flattened token axis, no loop over tokens and no per-token gather.

The shifts run over the flattened [B*T, D] input as if it were one sequence, so each document's first W-1
tokens read the W-1 inputs before its start (another document's, or nothing at the very start) where they
should read its initial state (or zeros). A small [N, W-1, D] boundary correction swaps one for the other:
the correction is the initial state's contribution with (initial state - preceding inputs) in its place, and
its gradient is the initial state's gradient, taken back from the preceding rows. The backward recomputes the
pre-activation from x (nothing but the input is saved) and runs the same shifts the other way.
"""
import torch
import torch.nn.functional as F

from kernels.conv.documents import (DocumentLayout, initial_state_contribution, initial_state_grad,
                                    initial_state_weight_grad)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (the tests' ground truth)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _boundary_state(x: torch.Tensor, initial_state: torch.Tensor | None, layout: DocumentLayout,
                    width: int) -> torch.Tensor:
    """[N, D, W-1]: what each document should see before its start minus what the shifts feed it there."""
    rows, exists = layout.preceding_rows(width - 1)
    preceding = torch.where(exists.unsqueeze(2), x[rows], 0).transpose(1, 2)
    return -preceding if initial_state is None else initial_state.to(x.dtype) - preceding


def preactivation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None, layout: DocumentLayout) -> torch.Tensor:
    """bias + sum_s weight[:, W-1-s] * x[t-s] within each document, x [B*T, D]; in the compute dtype."""
    dtype = _compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    width = weight.shape[1]
    pre = x * weight[:, width - 1]
    if bias is not None:
        pre += bias.to(dtype)
    for shift in range(1, min(width, x.shape[0])):
        pre[shift:].addcmul_(x[:-shift], weight[:, width - 1 - shift])
    if width > 1:
        rows, valid = layout.head_rows(width - 1)
        correction = initial_state_contribution(_boundary_state(x, initial_state, layout, width), weight)
        pre.index_put_((rows.flatten(),), torch.where(valid.unsqueeze(2), correction, 0).flatten(0, 1),
                       accumulate=True)
    return pre


def conv_forward_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       initial_state: torch.Tensor | None, layout: DocumentLayout, activation: str | None,
                       ) -> torch.Tensor:
    """y [B*T, D] in x's dtype from x [B*T, D]."""
    pre = preactivation(x, weight, bias, initial_state, layout)
    return (F.silu(pre, inplace=True) if activation == "silu" else pre).to(x.dtype)


def conv_backward_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        initial_state: torch.Tensor | None, final_state_grad: torch.Tensor | None,
                        layout: DocumentLayout, activation: str | None, grad_y: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(dx [B*T, D] in x's dtype, dweight [D, W], dbias [D] or None, head_grad [N, W-1, D]): head_grad is the
    pre-activation gradient of each document's first W-1 tokens (zero past its end), for d initial_state."""
    input_dtype, dtype = x.dtype, _compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    width = weight.shape[1]
    # Few fresh [B*T, D] buffers: on CPU each costs page faults that outweigh the arithmetic on it.
    pre = preactivation(x, weight, bias, initial_state, layout)
    grad = grad_y.to(dtype)
    if activation == "silu":
        grad = torch.ops.aten.silu_backward(grad, pre)
    grad_x = torch.mul(grad, weight[:, width - 1], out=pre)  # pre's buffer, no longer needed
    products = torch.empty_like(grad)
    grad_weight = torch.zeros(width, x.shape[1], dtype=dtype, device=x.device)  # shifts past the input: zero
    grad_weight[width - 1] = torch.mul(grad, x, out=products).sum(0)
    for shift in range(1, min(width, x.shape[0])):
        grad_x[:-shift].addcmul_(grad[shift:], weight[:, width - 1 - shift])
        grad_weight[width - 1 - shift] = torch.mul(grad[shift:], x[:-shift], out=products[shift:]).sum(0)
    del products
    grad_weight = grad_weight.T

    rows, valid = layout.head_rows(width - 1)
    head_grad = torch.where(valid.unsqueeze(2), grad[rows], 0)
    if width > 1:  # the boundary correction's gradients
        boundary = _boundary_state(x, initial_state, layout, width)
        grad_weight = grad_weight + initial_state_weight_grad(head_grad, boundary)
        rows, exists = layout.preceding_rows(width - 1)
        fed_back = torch.where(exists.unsqueeze(1), initial_state_grad(head_grad, weight, None, layout), 0)
        grad_x.index_put_((rows.flatten(),), -fed_back.transpose(1, 2).flatten(0, 1), accumulate=True)
    if final_state_grad is not None:
        rows, from_input = layout.tail_rows(width - 1)
        carried = torch.where(from_input.unsqueeze(2), final_state_grad.transpose(1, 2).to(dtype), 0)
        grad_x.index_put_((rows.flatten(),), carried.flatten(0, 1), accumulate=True)
    grad_bias = grad.sum(0) if bias is not None else None
    return grad_x.to(input_dtype), grad_weight, grad_bias, head_grad
