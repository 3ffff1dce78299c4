"""The block-diagonal scan one token at a time in Triton: the decode path on CUDA (T = 1 with the cached state) and
short inputs. Each program walks one sequence for one head and block of channels, its two state components in
registers. The backward is the chunkwise one (triton_scan.py): the function is the same, only the schedule differs.
"""
import torch
import triton
import triton.language as tl

from kernels.block_diagonal_scan.triton_scan import ScanForwards, block_diagonal_scan_op, prepare_inputs
from kernels.common.chunks import ChunkIndex
from kernels.tuning import autotune


@autotune([triton.Config({"BD": 64}, num_warps=2), triton.Config({"BD": 128}, num_warps=4),
           triton.Config({"BD": 32}, num_warps=1)], key=["H", "D", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def fused_recurrent_block_scan_kernel(a, b, h, initial_state, final_state, cu_seqlens, H: tl.constexpr,
                                      D: tl.constexpr, BD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                                      STORE_FINAL_STATE: tl.constexpr):
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    cols = i_d * BD + tl.arange(0, BD)
    mask = cols < D
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    state_offsets = ((i_n.to(tl.int64) * H + i_h) * D + cols) * 2
    s0 = tl.zeros([BD], dtype=tl.float32)
    s1 = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        s0 += tl.load(initial_state + state_offsets, mask=mask, other=0.0).to(tl.float32)
        s1 += tl.load(initial_state + state_offsets + 1, mask=mask, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        channel = (t * H + i_h) * D + cols
        a00 = tl.load(a + channel * 4, mask=mask, other=0.0).to(tl.float32)
        a01 = tl.load(a + channel * 4 + 1, mask=mask, other=0.0).to(tl.float32)
        a10 = tl.load(a + channel * 4 + 2, mask=mask, other=0.0).to(tl.float32)
        a11 = tl.load(a + channel * 4 + 3, mask=mask, other=0.0).to(tl.float32)
        n0 = a00 * s0 + a01 * s1 + tl.load(b + channel * 2, mask=mask, other=0.0).to(tl.float32)
        s1 = a10 * s0 + a11 * s1 + tl.load(b + channel * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        s0 = n0
        tl.store(h + channel * 2, s0.to(h.dtype.element_ty), mask=mask)
        tl.store(h + channel * 2 + 1, s1.to(h.dtype.element_ty), mask=mask)
    if STORE_FINAL_STATE:
        tl.store(final_state + state_offsets, s0, mask=mask)
        tl.store(final_state + state_offsets + 1, s1, mask=mask)


def fused_recurrent_block_diagonal_scan_fwd(a, b, initial_state, output_final_state: bool, chunks: ChunkIndex):
    """(h, final state or None), one token at a time."""
    B, T, H, D, _ = b.shape
    h = torch.empty_like(b)
    final = (torch.empty(chunks.num_sequences, H, D, 2, dtype=torch.float32, device=b.device)
             if output_final_state else None)
    grid = lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_sequences * H)  # noqa: E731
    fused_recurrent_block_scan_kernel[grid](a, b, h, initial_state, final, chunks.cu_seqlens, H=H, D=D,
                                            USE_INITIAL_STATE=initial_state is not None,
                                            STORE_FINAL_STATE=output_final_state)
    return h, final


ScanForwards.recurrent = staticmethod(fused_recurrent_block_diagonal_scan_fwd)


def fused_recurrent_block_diagonal_scan_triton(a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as `kernels.block_diagonal_scan.fused_recurrent_block_diagonal_scan`."""
    a, b, initial_state = prepare_inputs(a, b, initial_state)
    return block_diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state, True)
