"""The block-diagonal linear scan: a 2x2 linear recurrence per channel.

    h_t = A_t h_{t-1} + b_t,    h_t, b_t in R^2 and A_t in R^{2x2} per channel (any matrix: singular, of any sign)

The diagonal scan (kernels/diagonal_scan) with a 2x2 block per channel in place of a number: what a Newton step
of a nonlinear RNN whose state is two numbers per channel solves (ParaRNN's LSTM, state (h, c): its Jacobian is
block-diagonal with 2x2 blocks, model/pararnn.py). The state contract of ARCHITECTURE.md, the output being the state:

    h, final_state = op(a, b, initial_state=None, output_final_state=False, cu_seqlens=None)
    a: [B, T, H, D, 2, 2]    b, h: [B, T, H, D, 2]    states: [N, H, D, 2] fp32 (N = B, or cu_seqlens' sequences)

differentiable in a, b and initial_state; the backward is the same scan run backwards with the transposed blocks.
Entry points dispatch by device (kernels/backend.py): CUDA -> Triton, otherwise chunked PyTorch; the Triton
modules are imported on first use. Sequence parallelism: block_diagonal_scan_state_summary gives each sequence's
final state from zero and its transition (the product of its blocks), combine_block_diagonal_states continues
an incoming state with them.
"""
import torch

from kernels.backend import use_triton
from kernels.block_diagonal_scan.chunk import chunk_block_diagonal_scan_torch, matvec
from kernels.block_diagonal_scan.naive import naive_block_diagonal_scan
from kernels.common import check_recurrent_inputs, compute_dtype


def check_block_scan_inputs(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None,
                            cu_seqlens: torch.Tensor | None) -> None:
    if b.dim() != 5 or b.shape[-1] != 2:
        raise ValueError(f"b must be [B, T, H, D, 2], got shape {tuple(b.shape)}")
    if a.shape != (*b.shape, 2):
        raise ValueError(f"a must be [B, T, H, D, 2, 2] = {(*b.shape, 2)}, got {tuple(a.shape)}")
    flat = b[..., 0]
    N = check_recurrent_inputs(flat, flat, flat, None, cu_seqlens)
    if initial_state is not None and initial_state.shape != (N, *b.shape[2:]):
        raise ValueError(f"initial_state must be [N, H, D, 2] = [{N}, {b.shape[2]}, {b.shape[3]}, 2], "
                         f"got {tuple(initial_state.shape)}")


def chunk_block_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise scan for training and prefill. a [B,T,H,D,2,2], b [B,T,H,D,2]; states [N,H,D,2] fp32. Returns
    (h [B,T,H,D,2] in b's dtype, final state or None)."""
    check_block_scan_inputs(a, b, initial_state, cu_seqlens)
    if use_triton(b):
        from kernels.block_diagonal_scan.triton_scan import chunk_block_diagonal_scan_triton
        return chunk_block_diagonal_scan_triton(a, b, initial_state, output_final_state, cu_seqlens)
    return chunk_block_diagonal_scan_torch(a, b, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_block_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step scan for decoding and short inputs; same contract as chunk_block_diagonal_scan."""
    check_block_scan_inputs(a, b, initial_state, cu_seqlens)
    if use_triton(b):
        from kernels.block_diagonal_scan.fused_recurrent import fused_recurrent_block_diagonal_scan_triton
        return fused_recurrent_block_diagonal_scan_triton(a, b, initial_state, output_final_state, cu_seqlens)
    return naive_block_diagonal_scan(a, b, initial_state, output_final_state, cu_seqlens)


def block_diagonal_scan_state_summary(a: torch.Tensor, b: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_block_diagonal_scan's state summary, for sequence parallelism: per sequence the final state from a
    zero start, h_local [N,H,D,2] fp32, and the transition M [N,H,D,2,2] fp32, the product A_last ... A_first of
    its blocks (fp64 for fp64 inputs): the final state from h_0 is M h_0 + h_local. Both from one scan over three
    copies of the channels (b from zero, and 0 from each unit vector: M's columns), so every device runs its own
    scan, differentiably."""
    check_block_scan_inputs(a, b, None, cu_seqlens)
    B, T, H, D = b.shape[:4]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    dtype = compute_dtype(a, b)
    eye = torch.eye(2, dtype=dtype, device=b.device)
    starts = torch.cat([torch.zeros(N, H, D, 2, dtype=dtype, device=b.device), eye.expand(N, H, D, 2, 2).movedim(3, 2)
                        .reshape(N, H, 2 * D, 2)], 2)  # [N, H, 3D, 2]: 0, then e_0 and e_1 for every channel
    _, final = chunk_block_diagonal_scan(torch.cat([a, a, a], 3), torch.cat([b, b.new_zeros(B, T, H, 2 * D, 2)], 3),
                                         starts, output_final_state=True, cu_seqlens=cu_seqlens)
    local_state, columns = final.split([D, 2 * D], 2)
    return local_state, columns.view(N, H, 2, D, 2).movedim(2, -1)  # transition[..., i, j] = column j's row i


def combine_block_diagonal_states(transition: torch.Tensor, local_state: torch.Tensor,
                                  incoming: torch.Tensor) -> torch.Tensor:
    """A slice's outgoing state M S_in + S_local (the RecurrentCore's combine: M is a 2x2 block per channel)."""
    return matvec(transition, incoming) + local_state


__all__ = ["block_diagonal_scan_state_summary", "check_block_scan_inputs", "chunk_block_diagonal_scan",
           "chunk_block_diagonal_scan_torch", "combine_block_diagonal_states", "fused_recurrent_block_diagonal_scan",
           "naive_block_diagonal_scan"]
