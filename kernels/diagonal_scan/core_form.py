"""The diagonal scan in the call form of the recurrent cores (model/registry.py's RecurrentCore), so that the
mixers' recurrent_scan / recurrent_step and sequence parallelism (parallel/sequence.py) run it unchanged.

That form is op(q, k, v, <gates>, scale=, initial_state=, output_final_state=, cu_seqlens=) -> (o, final) with
states [N, H, K, V], and summaries (S_local, transition) whose diagonal transition [N, H, K] scales the state's
rows. The diagonal scan is the case K = D, V = 1 (a column per head), written by k * v:

    h_t = a_t * h_{t-1} + k_t * v_t,    o_t = h_t        (a, k, v, o: [B, T, H, D]; states [N, H, D, 1])

There is no query, the output being the state itself: q and scale are accepted and ignored (callers pass k).
"""
import torch

from kernels.common import autograd_vjp, compute_dtype
from kernels.diagonal_scan import chunk_diagonal_scan, diagonal_scan_state_summary, fused_recurrent_diagonal_scan


def _write(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """k * v in the compute dtype; v is not cast (type promotion does it), so the product's backward keeps v
    itself, not an fp32 copy of it."""
    return k.to(compute_dtype(k, v, a)) * v


def _run(op, k, v, a, initial_state, output_final_state, cu_seqlens):
    h, final = op(a, _write(k, v, a), None if initial_state is None else initial_state.squeeze(-1),
                  output_final_state, cu_seqlens)
    return h.to(v.dtype), (final.unsqueeze(-1) if final is not None else None)


def chunk_diagonal_scan_kv(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """chunk_diagonal_scan(a, k * v) in the cores' form: (o [B, T, H, D] in v's dtype, final state [N, H, D, 1])."""
    return _run(chunk_diagonal_scan, k, v, a, initial_state, output_final_state, cu_seqlens)


def chunk_diagonal_scan_kv_vjp(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                               do: torch.Tensor, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None) -> tuple:
    """chunk_diagonal_scan_kv's input gradients (None for the unused q, dk, dv, [da], d initial_state or None) for
    the output gradient do (chunk_gla_vjp's contract, for the recomputation around the scan in
    model/recurrent.py). The scan is one elementwise pass over the tokens, so it runs again under autograd."""
    dk, dv, da, d_initial = autograd_vjp(
        lambda k, v, a, h0: chunk_diagonal_scan_kv(None, k, v, a, initial_state=h0, cu_seqlens=cu_seqlens)[0],
        (k, v, a), do, initial_state)
    return None, dk, dv, [da], d_initial


def fused_recurrent_diagonal_scan_kv(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode form of chunk_diagonal_scan_kv (fused_recurrent_diagonal_scan)."""
    return _run(fused_recurrent_diagonal_scan, k, v, a, initial_state, output_final_state, cu_seqlens)


def diagonal_scan_kv_state_summary(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                   cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_local [N, H, D, 1] fp32, the diagonal transition [N, H, D] fp32) of chunk_diagonal_scan_kv."""
    local_state, transition = diagonal_scan_state_summary(a, _write(k, v, a), cu_seqlens)
    return local_state.unsqueeze(-1), transition
