"""Rotary embedding of one token per row in plain PyTorch: the ground truth and the CPU path."""
import torch


def naive_rotate_rows(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] at positions [B] rotated as x cos + rotate_half(x) sin in fp32, angles positions * inv_freq
    (inv_freq [D]: the rotary frequencies repeated for both halves), returned in x's dtype."""
    angles = (positions[:, None] * inv_freq)[:, None]  # [B, 1, D] fp32
    x32 = x.float()
    x1, x2 = x32.chunk(2, -1)
    return (x32 * angles.cos() + torch.cat((-x2, x1), -1) * angles.sin()).to(x.dtype)
