"""The block-diagonal scan in the call form of the recurrent cores (model/registry.py's RecurrentCore), so that
sequence parallelism (parallel/sequence.py) runs it unchanged: op(q, k, v, a=, scale=, initial_state=,
output_final_state=, cu_seqlens=) -> (o, final), written by k * v:

    h_t = A_t h_{t-1} + k_t * v_t,    o_t = h_t        (k, v, o: [B, T, H, D, 2]; A: [B, T, H, D, 2, 2])

with states [N, H, D, 2] (the cores' [N, H, K, V] with K = D, V = 2), the summary's transition a 2x2 block per
channel [N, H, D, 2, 2] and its own combine (M S_in + S_local per channel). q and scale are accepted and ignored.
"""
import torch

from kernels.block_diagonal_scan import (block_diagonal_scan_state_summary, chunk_block_diagonal_scan,
                                         fused_recurrent_block_diagonal_scan)
from kernels.common import compute_dtype


def _write(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return k.to(compute_dtype(k, v, a)) * v


def chunk_block_diagonal_scan_kv(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                 scale: float | None = None, initial_state: torch.Tensor | None = None,
                                 output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """chunk_block_diagonal_scan(a, k * v) in the cores' form: (o [B, T, H, D, 2] in v's dtype, final state)."""
    h, final = chunk_block_diagonal_scan(a, _write(k, v, a), initial_state, output_final_state, cu_seqlens)
    return h.to(v.dtype), final


def fused_recurrent_block_diagonal_scan_kv(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode form of chunk_block_diagonal_scan_kv."""
    h, final = fused_recurrent_block_diagonal_scan(a, _write(k, v, a), initial_state, output_final_state, cu_seqlens)
    return h.to(v.dtype), final


def block_diagonal_scan_kv_state_summary(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_local [N, H, D, 2] fp32, the transition [N, H, D, 2, 2] fp32) of chunk_block_diagonal_scan_kv."""
    local_state, transition = block_diagonal_scan_state_summary(a, _write(k, v, a), cu_seqlens)
    return local_state.float(), transition.float()
