"""The diagonal scan one token at a time in Triton: the decode path on CUDA (T = 1 with the cached state) and
short inputs. Each program walks one sequence for one head and block of channels, its state in registers. The
backward is the chunkwise one (triton_scan.py): the function is the same, only the forward schedule differs.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import ChunkIndex
from kernels.diagonal_scan.triton_scan import ScanForwards, diagonal_scan_op, prepare_inputs
from kernels.tuning import autotune


@autotune([triton.Config({"BD": 64}, num_warps=2), triton.Config({"BD": 128}, num_warps=4),
           triton.Config({"BD": 32}, num_warps=1)], key=["H", "D", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def fused_recurrent_scan_kernel(a, b, h, initial_state, final_state, cu_seqlens, H: tl.constexpr, D: tl.constexpr,
                                BD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr):
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    cols = i_d * BD + tl.arange(0, BD)
    mask = cols < D
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    state_offsets = (i_n.to(tl.int64) * H + i_h) * D + cols
    state = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        state += tl.load(initial_state + state_offsets, mask=mask, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        offsets = (t * H + i_h) * D + cols
        state = (tl.load(a + offsets, mask=mask, other=0.0).to(tl.float32) * state
                 + tl.load(b + offsets, mask=mask, other=0.0).to(tl.float32))
        tl.store(h + offsets, state.to(h.dtype.element_ty), mask=mask)
    if STORE_FINAL_STATE:
        tl.store(final_state + state_offsets, state, mask=mask)


def fused_recurrent_diagonal_scan_fwd(a, b, initial_state, output_final_state: bool, chunks: ChunkIndex):
    """(h, final state or None), one token at a time."""
    B, T, H, D = b.shape
    h = torch.empty_like(b)
    final = (torch.empty(chunks.num_sequences, H, D, dtype=torch.float32, device=b.device)
             if output_final_state else None)
    grid = lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_sequences * H)  # noqa: E731
    fused_recurrent_scan_kernel[grid](a, b, h, initial_state, final, chunks.cu_seqlens, H=H, D=D,
                                      USE_INITIAL_STATE=initial_state is not None,
                                      STORE_FINAL_STATE=output_final_state)
    return h, final


ScanForwards.recurrent = staticmethod(fused_recurrent_diagonal_scan_fwd)


def fused_recurrent_diagonal_scan_triton(a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as `kernels.fused_recurrent_diagonal_scan`."""
    a, b, initial_state = prepare_inputs(a, b, initial_state)
    return diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state, True)
