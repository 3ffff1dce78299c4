"""The diagonal linear scan: an elementwise linear recurrence with signed coefficients.

    h_t = a_t * h_{t-1} + b_t,    a_t, b_t, h_t in R^D per head, a_t any real number (negative and zero too)

Hawk/Griffin's RG-LRU runs on it (model/rglru.py), and so can a Newton step of a nonlinear RNN trained in
parallel (ParaRNN: h_t = J_t h_{t-1} + r_t with diagonal Jacobians J_t, of either sign). Nothing is taken in log
space. The state contract of ARCHITECTURE.md with the output being the state itself:

    h, final_state = op(a, b, initial_state=None, output_final_state=False, cu_seqlens=None)
    a, b, h: [B, T, H, D]    states: [N, H, D] fp32 (N = B, or the number of sequences of cu_seqlens)

differentiable in a, b and initial_state. Entry points dispatch by device (kernels/backend.py): CUDA -> Triton,
otherwise chunked PyTorch; the Triton modules are imported on first use.
"""
import torch

from kernels.backend import use_triton
from kernels.common import check_recurrent_inputs
from kernels.diagonal_scan.chunk import chunk_diagonal_scan_torch
from kernels.diagonal_scan.naive import naive_diagonal_scan
from kernels.diagonal_scan.summary import sequence_products


def check_scan_inputs(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None) -> None:
    if b.dim() != 4:
        raise ValueError(f"b must be [B, T, H, D], got shape {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a must have b's shape {tuple(b.shape)}, got {tuple(a.shape)}")
    N = check_recurrent_inputs(b, b, b, None, cu_seqlens)
    if initial_state is not None and initial_state.shape != (N, *b.shape[2:]):
        raise ValueError(f"initial_state must be [N, H, D] = [{N}, {b.shape[2]}, {b.shape[3]}], "
                         f"got {tuple(initial_state.shape)}")


def chunk_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise scan for training and prefill. a, b [B,T,H,D]; states [N,H,D] fp32. Returns (h [B,T,H,D] in
    b's dtype, final state or None)."""
    check_scan_inputs(a, b, initial_state, cu_seqlens)
    if use_triton(b):
        from kernels.diagonal_scan.triton_scan import chunk_diagonal_scan_triton
        return chunk_diagonal_scan_triton(a, b, initial_state, output_final_state, cu_seqlens)
    return chunk_diagonal_scan_torch(a, b, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step scan for decoding and short inputs; same contract as chunk_diagonal_scan."""
    check_scan_inputs(a, b, initial_state, cu_seqlens)
    if use_triton(b):
        from kernels.diagonal_scan.fused_recurrent import fused_recurrent_diagonal_scan_triton
        return fused_recurrent_diagonal_scan_triton(a, b, initial_state, output_final_state, cu_seqlens)
    return naive_diagonal_scan(a, b, initial_state, output_final_state, cu_seqlens)


def diagonal_scan_state_summary(a: torch.Tensor, b: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_diagonal_scan's state summary, for sequence parallelism: per sequence the final state from a zero
    start, h_local [N,H,D] fp32, and the transition A [N,H,D] fp32, the product of a over the sequence: the scan's
    final state from h_0 is A * h_0 + h_local. h_local comes from the scan itself (its outputs are its states: no
    cheaper state-only pass exists), A from PyTorch on every device."""
    check_scan_inputs(a, b, None, cu_seqlens)
    _, local_state = chunk_diagonal_scan(a, b, output_final_state=True, cu_seqlens=cu_seqlens)
    return local_state, sequence_products(a, cu_seqlens)


__all__ = ["check_scan_inputs", "chunk_diagonal_scan", "chunk_diagonal_scan_torch", "diagonal_scan_state_summary",
           "fused_recurrent_diagonal_scan", "naive_diagonal_scan"]
