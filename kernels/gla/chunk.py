"""Gated linear attention, chunked, in PyTorch: the CPU path (backward by autograd).

Within a chunk of C=64 tokens let b_t be the cumulative log gate from the chunk's start. Then
    o_t     = scale * [ (q_t * exp(b_t))^T S_0 + sum_{s<=t} (q_t . (k_s * exp(b_t - b_s))) v_s ]
    S_next  = exp(b_C) * S_0 + sum_s (k_s * exp(b_C - b_s)) v_s^T
The intra-chunk matrix with a vector gate needs exp(b_t - b_s) per key dimension. When no chunk decays
by more than e^-60 in any dimension (the usual case: GLA's gates are close to one) it factorises,
(q_t exp(b_t)) . (k_s exp(-b_s)), one matmul per chunk, every factor within e^+-60 of its input (fp32
holds e^+-87). Otherwise it takes the sub-chunk form of kernels/common/intra_chunk.py, which exponentiates
only terms <= 0.
A scalar gate needs only the masked [C, C] matrix exp(b_t - b_s).
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds
from kernels.common.intra_chunk import intra_chunk_vector_attention, strictly_earlier_decay

FACTORIZED_MAX_DECAY = 60.0  # largest -log decay over one chunk for which exp(+-b) stays well inside fp32


def chunk_gla_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    scale: float | None = None, initial_state: torch.Tensor | None = None,
                    output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, initial_state), v.dtype
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, q.device)
    scalar_gate = g.dim() == 3

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [chunks, H, C, D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, H, -1).to(dtype)).transpose(1, 2)

    q, k, v, g = chunked(q) * scale, chunked(k), chunked(v), chunked(g)
    b = g.cumsum(2)  # [chunks, H, C, K or 1]
    if scalar_gate:
        o = _intra_chunk_scalar(q, k, b[..., 0]) @ v
    elif b.numel() and -b[:, :, -1].min().item() <= FACTORIZED_MAX_DECAY:
        o = _intra_chunk_factorized(q, k, b) @ v
    else:
        o = intra_chunk_vector_attention(q, k, g, b) @ v

    # Inter-chunk: each chunk maps its incoming state S to exp(b_C) * S + U; scan that over the chunks.
    to_end = _reverse_cumsum(g[:, :, 1:], dim=2)  # b_C - b_s = the gates after s, as a sum
    to_end = torch.cat([to_end, torch.zeros_like(g[:, :, :1])], 2)
    update = (k * torch.exp(to_end)).transpose(-1, -2) @ v  # [chunks, H, K, V]
    decay = layout.to_grid(torch.exp(b[:, :, -1:]).transpose(-1, -2), 1.0)  # [N, max_chunks, H, K or 1, 1]
    update = layout.to_grid(update, 0.0)
    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(layout.num_seqs, H, K, V))
    incoming = []
    for c in range(layout.max_chunks):
        incoming.append(state)
        state = torch.addcmul(update[:, c], decay[:, c], state)
    if incoming:
        o = o + (q * torch.exp(b)) @ layout.from_grid(torch.stack(incoming, 1))
    o = layout.from_chunks(o.transpose(1, 2)).view(B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def _reverse_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.flip(dim).cumsum(dim).flip(dim)


def _intra_chunk_scalar(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[chunks, H, C, C] lower-triangular attention matrix for a scalar gate; b is [chunks, H, C]."""
    same = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)  # exp(0), independent of b
    return (q @ k.transpose(-1, -2)) * (strictly_earlier_decay(b.unsqueeze(-1)).squeeze(-1) + same)


def _intra_chunk_factorized(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[chunks, H, C, C] attention matrix for a vector gate whose chunks decay by at most e^-60."""
    C = q.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    return ((q * torch.exp(b)) @ (k * torch.exp(-b)).transpose(-1, -2)).masked_fill(~causal, 0.0)
