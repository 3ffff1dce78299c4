"""RMSNorm (with an optional SiLU gate) forward in Triton: one launch for what is six to ten eager operations.

A program normalises ROWS rows of the flattened [rows, D] input, each row whole (BD = D rounded up to a power of
two) in fp32, and writes y in the output dtype and rstd in fp32 to fresh buffers: no kernel reads what it
writes, so the autotuner may launch it any number of times.
"""
import torch
import triton
import triton.language as tl

from kernels.tuning import autotune

# One row per program suits the wide rows of the residual stream (d_model), four per program the head-sized
# rows of a mixer's output norm (a decode step's B x H rows of 64-256).
CONFIGS = [triton.Config({"ROWS": 1}, num_warps=4),
           triton.Config({"ROWS": 1}, num_warps=8),
           triton.Config({"ROWS": 4}, num_warps=4)]


@autotune(CONFIGS, key=["D"])
@triton.jit(do_not_specialize=["num_rows"])
def rms_norm_fwd_kernel(x, gate, weight, y, rstd, num_rows, D, eps, HAS_GATE: tl.constexpr,
                        NORM_BEFORE_GATE: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    row_mask, col_mask = rows < num_rows, cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x32 = tl.load(x + offsets, mask=mask, other=0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate + offsets, mask=mask, other=0).to(tl.float32)
        silu = g * tl.sigmoid(g)
        if not NORM_BEFORE_GATE:
            x32 = x32 * silu
    row_rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / D + eps)
    w = tl.load(weight + cols, mask=col_mask, other=0).to(tl.float32)
    out = x32 * row_rstd[:, None] * w[None, :]
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            out = out * silu
    tl.store(y + offsets, out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, row_rstd, mask=row_mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float,
                    out_dtype: torch.dtype, norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, gate [rows, D] contiguous -> (y [rows, D] in out_dtype, rstd [rows] fp32)."""
    num_rows, D = x.shape
    y = torch.empty(num_rows, D, dtype=out_dtype, device=x.device)
    rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    rms_norm_fwd_kernel[lambda meta: (triton.cdiv(num_rows, meta["ROWS"]),)](
        x, gate, weight, y, rstd, num_rows, D, eps, HAS_GATE=gate is not None, NORM_BEFORE_GATE=norm_before_gate,
        BD=triton.next_power_of_2(D))
    return y, rstd
