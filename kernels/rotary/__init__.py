"""Rotary embedding of one token per row at its own position: a decode step's queries and keys. CUDA tensors
take the Triton kernel (triton_rotary.py, one launch), others the PyTorch formula (naive.py), both behind one
custom op (forward only: decoding needs no gradients), so torch.compile treats it as one opaque call.
"""
import torch

from kernels.backend import use_triton
from kernels.rotary.naive import naive_rotate_rows


def _forward_op(x, positions, inv_freq):
    if use_triton(x):
        from kernels.rotary.triton_rotary import rotate_rows_triton
        return rotate_rows_triton(x, positions, inv_freq)
    return naive_rotate_rows(x, positions, inv_freq)


_rotate = torch.library.custom_op("baton::rotate_rows", _forward_op, mutates_args=(),
                                  schema="(Tensor x, Tensor positions, Tensor inv_freq) -> Tensor")


@_rotate.register_fake
def _(x, positions, inv_freq):
    return x.new_empty(x.shape)


def rotate_rows(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] (D even), positions [B] (each row's position), inv_freq [D] fp32 (the rotary frequencies
    repeated for both halves) -> x cos + rotate_half(x) sin computed in fp32, in x's dtype."""
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [B, H, D] with an even D, got shape {tuple(x.shape)}")
    B, _, D = x.shape
    if positions.shape != (B,) or positions.is_floating_point():
        raise ValueError(f"positions must be an integer tensor [B] = [{B}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if inv_freq.shape != (D,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be fp32 [D] = [{D}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    return _rotate(x.contiguous(), positions.contiguous(), inv_freq.contiguous())


__all__ = ["naive_rotate_rows", "rotate_rows"]
