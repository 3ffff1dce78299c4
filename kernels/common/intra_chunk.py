"""The intra-chunk attention matrix of a vector (per key dimension) gate, in PyTorch, with every exponentiated
term <= 0 (no factor above 1, so no gate value, however negative, overflows):

    A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)  for s <= t,   b = the gate's cumulative sum within the chunk

The chunk is cut into sub-chunks of 16 tokens:
- queries in sub-chunk i against keys in an earlier sub-chunk j: exp(b_t - b_r) exp(b_r - b_s), split at the
  first token r of sub-chunk i, both factors <= 1 (flash-linear-attention's secondary chunking);
- the 16x16 blocks on the diagonal: the masked pairwise difference, exponentiated directly.
An exponent that is zero by construction (a token to itself) is the constant 0, never x - x: its gradient
would be two O(1) terms cancelling in fp32, an absolute error that swamps the true d g when the gates are
extreme (exp(-20) gives d g ~ exp(-20)). Used by GLA (kernels/gla/chunk.py) and KDA (kernels/kda/chunk.py).
"""
import torch

SUB_CHUNK_SIZE = 16


def strictly_earlier_decay(b: torch.Tensor) -> torch.Tensor:
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
        strict = torch.matmul(strictly_earlier_decay(b) * k.unsqueeze(-3), q.unsqueeze(-1)).squeeze(-1)
        return strict + torch.diag_embed((q * k).sum(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_attn: torch.Tensor):
        q, k, b = ctx.saved_tensors
        weighted = strictly_earlier_decay(b) * d_attn.unsqueeze(-1)  # [..., t, s, K]
        dq = (weighted * k.unsqueeze(-3)).sum(-2)
        dk = (weighted * q.unsqueeze(-2)).sum(-3)
        d_self = d_attn.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        return dq + d_self * k, dk + d_self * q, q * dq - k * dk


def intra_chunk_vector_attention(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
