"""Rotary embedding of one token per row (a decode step's queries and keys) in Triton: one launch.

A program rotates BH heads of one row, each head whole (BD = D rounded up to a power of two), reading the
partner half of each element (rotate_half) from x and computing the angles from the row's position; the result
goes to a fresh buffer, so any number of launches gives the same bytes.
"""
import torch
import triton
import triton.language as tl

from kernels.tuning import autotune

CONFIGS = [triton.Config({"BH": 4}, num_warps=4),
           triton.Config({"BH": 1}, num_warps=1),
           triton.Config({"BH": 16}, num_warps=4)]


@autotune(CONFIGS, key=["H", "D"])
@triton.jit
def rotary_rows_kernel(x, positions, inv_freq, y, H, D, BD: tl.constexpr, BH: tl.constexpr):
    i_b = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = tl.arange(0, BD)
    half = D // 2
    first_half = cols < half
    partner = tl.where(first_half, cols + half, cols - half)
    col_mask = cols < D
    mask = (heads < H)[:, None] & col_mask[None, :]
    base = (i_b.to(tl.int64) * H + heads[:, None]) * D
    own = tl.load(x + base + cols[None, :], mask=mask, other=0).to(tl.float32)
    other = tl.load(x + base + partner[None, :], mask=mask, other=0).to(tl.float32)
    rotated = tl.where(first_half[None, :], -other, other)  # rotate_half(x) = (-x2, x1)
    angles = tl.load(positions + i_b).to(tl.float32) * tl.load(inv_freq + cols, mask=col_mask, other=0)
    out = own * tl.cos(angles)[None, :] + rotated * tl.sin(angles)[None, :]
    tl.store(y + base + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


def rotate_rows_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] contiguous, positions [B], inv_freq [D] fp32 contiguous -> rotated x in x's dtype."""
    B, H, D = x.shape
    y = torch.empty_like(x)
    rotary_rows_kernel[lambda meta: (B, triton.cdiv(H, meta["BH"]))](
        x, positions, inv_freq, y, H, D, BD=triton.next_power_of_2(D))
    return y
