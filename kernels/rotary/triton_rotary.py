"""Rotary embedding of one token per row (a decode step's queries and keys) in Triton: one launch.

A program rotates BH heads of one row, each head whole (BD = D rounded up to a power of two), reading the
partner half of each element (rotate_half) from x and computing the angles from the row's position; the result
goes to a fresh buffer, so any number of launches gives the same bytes.

Cosine and sine are computed here (_cos_sin) rather than by tl.cos / tl.sin: libdevice's accurate cosf and sinf
carry a local-memory buffer for the reduction of huge arguments (32 bytes of stack per thread in every
compiled variant), where angles up to a context length in radians reduce exactly enough in fp64.
"""
import torch
import triton
import triton.language as tl

from kernels.tuning import autotune

CONFIGS = [triton.Config({"BH": 4}, num_warps=4),
           triton.Config({"BH": 1}, num_warps=1),
           triton.Config({"BH": 16}, num_warps=4)]


@triton.jit
def _cos_sin(x):
    """(cos x, sin x) of fp32 x to about an ulp: x = k pi/2 + r reduced in fp64 (exact enough for any |x| up to
    millions), then Cephes' minimax polynomials of cosf and sinf on |r| <= pi/4, and the quadrant k mod 4."""
    x64 = x.to(tl.float64)
    k = tl.floor(x64 * 0.6366197723675814 + 0.5)  # 2 / pi
    r = (x64 - k * 1.5707963267948966).to(tl.float32)  # pi / 2
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3
                                                                      + r2 * 2.443315711809948e-5))
    quadrant = k.to(tl.int64) & 3
    swap = (quadrant & 1) == 1
    cos_x = tl.where(swap, sin_r, cos_r)
    sin_x = tl.where(swap, cos_r, sin_r)
    cos_x = tl.where((quadrant == 1) | (quadrant == 2), -cos_x, cos_x)
    sin_x = tl.where(quadrant >= 2, -sin_x, sin_x)
    return cos_x, sin_x


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
    cos, sin = _cos_sin(angles)
    out = own * cos[None, :] + rotated * sin[None, :]
    tl.store(y + base + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


def rotate_rows_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] contiguous, positions [B], inv_freq [D] fp32 contiguous -> rotated x in x's dtype."""
    B, H, D = x.shape
    y = torch.empty_like(x)
    rotary_rows_kernel[lambda meta: (B, triton.cdiv(H, meta["BH"]))](
        x, positions, inv_freq, y, H, D, BD=triton.next_power_of_2(D))
    return y
