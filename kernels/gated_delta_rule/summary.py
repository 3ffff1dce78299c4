"""The gated delta rule's state summary of each sequence, in PyTorch (CPU and CUDA; backward by autograd).

The final state is affine in the initial one, S_final = M S_0 + S_local. With the WY factors of the chunk
kernel (chunk.py's wy_factors) a chunk maps S to exp(gamma_C) S + k_to_end (U - W S), so the state-only
pass runs the chunk-state recurrence alone, for S_local from zero and for M from the identity:
    S <- exp(gamma_C) S + k_to_end (U - W S),    M <- exp(gamma_C) M - k_to_end (W M)
No outputs: nothing involving q (no intra-chunk attention, no output from the states).
"""
import torch

from kernels.common import chunk_layout, compute_dtype, sequence_bounds
from kernels.gated_delta_rule.chunk import CHUNK_SIZE, wy_factors


def gated_delta_rule_state_summary_torch(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = compute_dtype(k, v, g, beta)
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype)).transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0, and grid slots past it are identity steps.
    gamma, _, W, U, k_to_end = wy_factors(*(chunked(x) for x in (k, v, g, beta)))
    decay_to_end = layout.to_grid(gamma[..., -1].exp()[..., None, None], 1.0)
    W, U, k_to_end = layout.to_grid(W, 0.0), layout.to_grid(U, 0.0), layout.to_grid(k_to_end, 0.0)
    state = W.new_zeros(layout.num_seqs, H, K, V)
    transition = torch.eye(K, dtype=dtype, device=k.device).expand(layout.num_seqs, H, K, K)
    # unbind, not [:, c]: each slice's backward would otherwise write a full-size zero gradient.
    for w_c, u_c, decay_c, k_c in zip(*(x.unbind(1) for x in (W, U, decay_to_end, k_to_end))):
        state = decay_c * state + k_c @ (u_c - w_c @ state)
        transition = decay_c * transition - k_c @ (w_c @ transition)
    return state, transition
