"""LION's full attention form: the whole masked and scaled attention matrix at once (short sequences).

    Y = Scale(Q K^T (.) M) V,   Scale dividing each row by its sum (normalize=True; without it, bidirectional
    GLA / Mamba2, the rows are left as they are), scale * q_i . k_j the scores.

The mask, per head (and per key dimension for a vector gate), with G_i = g_1 + ... + g_i the cumulative log decay
of the sequence (lambda_i = exp(g_i)):

    M_ij = prod_{m=j+1}^{i} lambda_m = exp(G_i - G_j)   for i >= j   (M^F: the forward recurrence)
    M_ij = prod_{m=i+1}^{j} lambda_m = exp(G_j - G_i)   for i <  j   (M^B: the backward recurrence)

so M = M^F + M^B - I is symmetric and M_ii = 1: the decays of the positions after the earlier token up to and
including the later one. A vector gate makes it M_ijk per key dimension k: A_ij = sum_k q_ik k_jk M_ijk. LION-LIT
(g None) is M = 1. Packed sequences (cu_seqlens) are padded to the longest one with zero keys, which add nothing
to a row or to its sum, so each attends only within itself. Memory is O(L^2) per head (O(L^2 K) for a vector
gate): this form is for short sequences; kernels/lion/chunk.py is the linear one.
"""
import torch

from kernels.common import chunk_layout, compute_dtype, sequence_bounds


def lion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                   scale: float | None = None, cu_seqlens: torch.Tensor | None = None, normalize: bool = True,
                   eps: float = 1e-6) -> torch.Tensor:
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K], [B, T, H] or None. Returns y [B, T, H, V]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g), v.dtype
    tensors = [q, k, v] + ([] if g is None else [g if g.dim() == 4 else g.unsqueeze(-1)])
    if cu_seqlens is None:  # the rows are the sequences: [B, H, T, D]
        to_heads = lambda x: x.to(dtype).transpose(1, 2)  # noqa: E731
        from_heads = lambda y: y.transpose(1, 2)  # noqa: E731
    else:  # one padded row per sequence: [N, H, L, D]
        bounds = sequence_bounds(cu_seqlens, B, T)
        longest = max([b - a for a, b in zip(bounds, bounds[1:])] + [1])
        layout = chunk_layout(bounds, longest, q.device)
        to_heads = lambda x: layout.to_chunks(x.reshape(B * T, H, -1).to(dtype)).transpose(1, 2)  # noqa: E731
        from_heads = lambda y: layout.from_chunks(y.transpose(1, 2)).view(B, T, H, -1)  # noqa: E731
    q, k, v, *gate = (to_heads(x) for x in tensors)
    L = q.shape[2]
    later = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # i >= j: the forward part
    if not gate:
        scores = scale * (q @ k.transpose(-1, -2))
    else:
        G = gate[0].cumsum(2)  # [S, H, L, K or 1]
        difference = G.unsqueeze(3) - G.unsqueeze(2)  # [S, H, L(i), L(j), K or 1]: G_i - G_j
        mask = torch.exp(torch.where(later[..., None], difference, -difference))
        if mask.shape[-1] == 1:
            scores = scale * (q @ k.transpose(-1, -2)) * mask[..., 0]
        else:
            scores = scale * torch.einsum("shik,shjk,shijk->shij", q, k, mask)
    y = scores @ v
    if normalize:
        y = y / (scores.sum(-1, keepdim=True) + eps)
    return from_heads(y).to(out_dtype)
