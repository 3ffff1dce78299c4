"""Gated linear attention, chunked, in PyTorch: the CPU path (backward by autograd).

Within a chunk of C=64 tokens let b_t be the cumulative log gate from the chunk's start. Then
    o_t     = scale * [ (q_t * exp(b_t))^T S_0 + sum_{s<=t} (q_t . (k_s * exp(b_t - b_s))) v_s ]
    S_next  = exp(b_C) * S_0 + sum_s (k_s * exp(b_C - b_s)) v_s^T
The intra-chunk matrix with a vector gate needs exp(b_t - b_s) per key dimension. When no chunk decays
by more than e^-60 in any dimension (the usual case: GLA's gates are close to one) it factorises,
(q_t exp(b_t)) . (k_s exp(-b_s)), one matmul per chunk, every factor within e^+-60 of its input (fp32
holds e^+-87). Otherwise the chunk is cut into blocks of 16 that keep every exponentiated term <= 0:
- queries in block i against keys in an earlier block j: exp(b_t - b_r) exp(b_r - b_s), split at the
  first token r of block i, both factors <= 1 (flash-linear-attention's secondary chunking);
- the 16x16 blocks on the diagonal: the masked pairwise difference, exponentiated directly.
On that path an exponent that is zero by construction (a token to itself, the chunk's last token to the
chunk's end) is the constant 0, never x - x: its gradient would be two O(1) terms cancelling in fp32, an
absolute error that swamps the true d g when the gates are extreme (exp(-20) gives d g ~ exp(-20)).
A scalar gate needs only the masked [C, C] matrix exp(b_t - b_s).
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds

SUB_CHUNK_SIZE = 16
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
        o = _intra_chunk_vector(q, k, g, b) @ v

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


def _strictly_earlier_decay(b: torch.Tensor) -> torch.Tensor:
    """exp(b_t - b_s) for s < t, else 0, over the second-to-last dim of b ([..., C, K]) -> [..., C(t), C(s), K]."""
    C = b.shape[-2]
    earlier = torch.ones(C, C, dtype=torch.bool, device=b.device).tril(-1)
    bias = torch.zeros(C, C, 1, dtype=b.dtype, device=b.device).masked_fill(~earlier.unsqueeze(-1), float("-inf"))
    return torch.exp(b.unsqueeze(-2) - b.unsqueeze(-3) + bias)


class DiagonalBlocks(torch.autograd.Function):
    """A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t, over [..., size, K] inputs -> [..., size, size].

    The backward recomputes the [size, size, K] decays rather than keeping them (16x the inputs), and
    leaves the t = s terms out of d b: they are exp(0) and do not depend on b."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, b)
        strict = torch.matmul(_strictly_earlier_decay(b) * k.unsqueeze(-3), q.unsqueeze(-1)).squeeze(-1)
        return strict + torch.diag_embed((q * k).sum(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_attn: torch.Tensor):
        q, k, b = ctx.saved_tensors
        weighted = _strictly_earlier_decay(b) * d_attn.unsqueeze(-1)  # [..., t, s, K]
        dq = (weighted * k.unsqueeze(-3)).sum(-2)
        dk = (weighted * q.unsqueeze(-2)).sum(-3)
        d_self = d_attn.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        return dq + d_self * k, dk + d_self * q, q * dq - k * dk


def _intra_chunk_scalar(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[chunks, H, C, C] lower-triangular attention matrix for a scalar gate; b is [chunks, H, C]."""
    same = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)  # exp(0), independent of b
    return (q @ k.transpose(-1, -2)) * (_strictly_earlier_decay(b.unsqueeze(-1)).squeeze(-1) + same)


def _intra_chunk_factorized(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[chunks, H, C, C] attention matrix for a vector gate whose chunks decay by at most e^-60."""
    C = q.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    return ((q * torch.exp(b)) @ (k * torch.exp(-b)).transpose(-1, -2)).masked_fill(~causal, 0.0)


def _intra_chunk_vector(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[chunks, H, C, C] lower-triangular attention matrix for a vector gate (inputs [chunks, H, C, K];
    b = g.cumsum over C)."""
    n, H, C, K = q.shape
    blocks, size = C // SUB_CHUNK_SIZE, SUB_CHUNK_SIZE
    q, k, g, b = (x.view(n, H, blocks, size, K) for x in (q, k, g, b))
    # Off-diagonal blocks (queries of block i, keys of block j < i), split at the first token r of block i:
    # b_t - b_r is the gates of block i after r; b_r - b_s includes g_r, so it is never zero by construction.
    from_first = torch.cat([torch.zeros_like(g[:, :, :, :1]), g[:, :, :, 1:]], 3).cumsum(3)
    q_decayed = q * torch.exp(from_first)
    b_first = b[:, :, :, :1]  # [n, H, i, 1, K]
    earlier = torch.ones(blocks, blocks, dtype=torch.bool, device=q.device).tril(-1)[:, :, None, None]
    k_decayed = k.unsqueeze(2) * torch.exp(torch.where(earlier, b_first.unsqueeze(3) - b.unsqueeze(2),
                                                       float("-inf")))  # [n, H, i, j, size, K]
    attn = torch.einsum("nhisk,nhijtk->nhisjt", q_decayed, k_decayed)
    diagonal = DiagonalBlocks.apply(q, k, b)  # [n, H, i, size, size]
    attn = attn + torch.diag_embed(diagonal.permute(0, 1, 3, 4, 2), dim1=2, dim2=4)
    return attn.reshape(n, H, C, C)
