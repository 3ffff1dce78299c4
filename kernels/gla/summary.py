"""GLA's state summary of each sequence, in PyTorch (CPU and CUDA; backward by autograd).

The final state is affine in the initial one, S_final = diag(a) S_0 + S_local, and with a diagonal gate both
parts have a closed form. With G_t the cumulative log gate of the sequence up to token t:
    S_local = sum_t (k_t * exp(G_end - G_t)) v_t^T,    a = exp(G_end)
No outputs and no attention within chunks: one T x K x V contraction, a fraction of the op. The exponents
G_end - G_t are sums of the gates after t (each <= 0), built in two levels that never subtract: within a
chunk of 64 tokens, then over the chunks that follow in the same sequence. Terms decayed below e^-60 are
dropped (decay_or_zero): over thousands of tokens most would otherwise be denormal numbers, slow on CPUs.
"""
import torch
import torch.nn.functional as F

from kernels.common import chunk_layout, compute_dtype, decay_or_zero, sequence_bounds
from kernels.gla.chunk import CHUNK_SIZE, _reverse_cumsum


def gla_state_summary_torch(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = compute_dtype(k, v, g)
    scalar_gate = g.dim() == 3
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [chunks, H, C, D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, H, -1).to(dtype)).transpose(1, 2)

    k, v, g = chunked(k), chunked(v), chunked(g)  # g: [chunks, H, C, K or 1]; padding has k = g = 0
    to_chunk_end = F.pad(_reverse_cumsum(g[:, :, 1:], dim=2), (0, 0, 0, 1))  # gates after t within its chunk
    chunk_decay = layout.to_grid(g.sum(2), 0.0)  # [N, max_chunks, H, K or 1]: each chunk's whole log decay
    after_chunk = F.pad(_reverse_cumsum(chunk_decay[:, 1:], dim=1), (0, 0, 0, 0, 0, 1))  # later chunks' decay
    to_end = to_chunk_end + layout.from_grid(after_chunk).unsqueeze(2)
    updates = (k * decay_or_zero(to_end)).transpose(-1, -2) @ v  # [chunks, H, K, V]
    sequence_of_chunk = layout.chunk_slot // max(layout.max_chunks, 1)
    state = updates.new_zeros(layout.num_seqs, H, K, V).index_add(0, sequence_of_chunk, updates)
    transition = decay_or_zero(chunk_decay.sum(1))  # [N, H, K or 1]
    return state, (transition.squeeze(-1) if scalar_gate else transition)
