"""Short causal depthwise convolution over time, with the last W-1 inputs as its state.

The state serves decoding (one token at a time, T=1 with the cached state) and the sequence-parallel halo
(the W-1 tokens of the previous rank). CUDA tensors take the Triton kernels (triton_conv.py), others the
PyTorch path (causal_conv.py), both behind one custom op (function.py) that saves only x and
recomputes the rest in the backward. No path syncs with the host: document boundaries are found on the device.
"""
import torch

from kernels.conv.causal_conv import conv_backward_torch, conv_forward_torch
from kernels.conv.function import causal_conv1d_op
from kernels.conv.naive import naive_causal_conv1d

ACTIVATIONS = (None, "silu")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B,T,D], weight [D,W], bias [D]; state [N,D,W-1] (the last W-1 inputs, zero-padded on the left).
    Returns (y [B,T,D] in x's dtype, final state in x's dtype or None); documents of cu_seqlens (B=1, offsets
    rising from 0 to T: not checked, checking would sync with the host) never see each other."""
    if x.dim() != 3 or x.shape[0] * x.shape[1] == 0:
        raise ValueError(f"x must be [B, T, D] with at least one token, got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"weight must be [D, W] = [{D}, W], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D] = [{D}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [N+1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (flattened sequences), got B={B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, D, W - 1):
        raise ValueError(f"initial_state must be [N, D, W-1] = [{N}, {D}, {W - 1}], got {tuple(initial_state.shape)}")
    return causal_conv1d_op(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)


__all__ = ["causal_conv1d", "conv_backward_torch", "conv_forward_torch", "naive_causal_conv1d"]
