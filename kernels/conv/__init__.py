"""Short causal depthwise convolution over time, with the last W-1 inputs as its state.

The state serves decoding (one token at a time) and the sequence-parallel halo (the W-1 tokens of the
previous rank). One PyTorch implementation serves every device: it is a few memory-bound
multiply-adds, so a Triton kernel would buy little.
"""
import torch

from kernels.conv.causal_conv import causal_conv1d_torch
from kernels.conv.naive import naive_causal_conv1d

ACTIVATIONS = (None, "silu")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B,T,D], weight [D,W], bias [D]; state [N,D,W-1] (the last W-1 inputs, zero-padded on the left).
    Returns (y [B,T,D], final state or None); documents of cu_seqlens (B=1) never see each other."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D, W] = [{D}, W], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D] = [{D}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (flattened sequences), got B={B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, D, W - 1):
        raise ValueError(f"initial_state must be [N, D, W-1] = [{N}, {D}, {W - 1}], got {tuple(initial_state.shape)}")
    return causal_conv1d_torch(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)


__all__ = ["causal_conv1d", "causal_conv1d_torch", "naive_causal_conv1d"]
