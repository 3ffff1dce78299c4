"""LION's bidirectional recurrence, one token at a time in each direction: the ground truth of kernels/lion.

Per head, with log decays g (lambda = exp(g) <= 1; a vector gate has one per key dimension, a scalar gate one
per head; LION-LIT has none, lambda = 1):

    forward   S^F_i = diag(lambda_i)     S^F_{i-1} + k_i v_i^T     z^F_i = lambda_i     z^F_{i-1} + k_i
    backward  S^B_i = diag(lambda_{i+1}) S^B_{i+1} + k_i v_i^T     z^B_i = lambda_{i+1} z^B_{i+1} + k_i
    y^D_i = scale q_i^T S^D_i - (scale q_i^T k_i / 2) v_i,   c^D_i = scale q_i^T z^D_i - scale q_i^T k_i / 2
    normalised (LION):   y_i = (y^F_i + y^B_i) / (c^F_i + c^B_i + eps)
    plain (bidirectional GLA / Mamba2):   y_i = y^F_i + y^B_i

Half the diagonal leaves each direction, so token i's own k_i v_i^T counts once. The backward direction decays by
lambda_{i+1} (the later token's decay), so the mask is symmetric: M_ij = M_ji = the product of lambda over the
positions after the earlier of i, j up to and including the later one (kernels/lion/full.py). Each sequence (a
row, or a document of cu_seqlens) is its own: both directions start from zero at its ends.
"""
import torch

from kernels.common import compute_dtype, sequence_bounds


def naive_recurrent_lion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                         scale: float | None = None, cu_seqlens: torch.Tensor | None = None, normalize: bool = True,
                         eps: float = 1e-6) -> torch.Tensor:
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K], [B, T, H] or None (no decay). Returns y [B, T, H, V]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g), v.dtype
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    g = torch.zeros(B, T, H, 1, dtype=dtype, device=q.device) if g is None else g.to(dtype)
    g = g if g.dim() == 4 else g.unsqueeze(-1)
    bounds = sequence_bounds(cu_seqlens, B, T)
    flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g)]
    outputs = [_sequence(*(x[bos:eos] for x in flat), normalize, eps) for bos, eos in zip(bounds, bounds[1:])]
    y = torch.cat(outputs, 0) if outputs else v.new_zeros(0, H, v.shape[-1])
    return y.view(B, T, H, -1).to(out_dtype)


def _sequence(q, k, v, g, normalize: bool, eps: float) -> torch.Tensor:
    """One sequence [L, H, *] (scale already in q): both recurrences, then the combination."""
    L, H, K = q.shape
    V = v.shape[-1]
    decay = g.exp()
    half_diagonal = (q * k).sum(-1, keepdim=True) / 2  # [L, H, 1]
    y_f, y_b, c_f, c_b = ([None] * L for _ in range(4))
    S, z = q.new_zeros(H, K, V), q.new_zeros(H, K)
    for i in range(L):
        S = decay[i].unsqueeze(-1) * S + k[i].unsqueeze(-1) * v[i].unsqueeze(-2)
        z = decay[i] * z + k[i]
        y_f[i] = torch.einsum("hk,hkv->hv", q[i], S) - half_diagonal[i] * v[i]
        c_f[i] = (q[i] * z).sum(-1, keepdim=True) - half_diagonal[i]
    S, z = q.new_zeros(H, K, V), q.new_zeros(H, K)
    for i in reversed(range(L)):
        if i + 1 < L:
            S, z = decay[i + 1].unsqueeze(-1) * S, decay[i + 1] * z
        S = S + k[i].unsqueeze(-1) * v[i].unsqueeze(-2)
        z = z + k[i]
        y_b[i] = torch.einsum("hk,hkv->hv", q[i], S) - half_diagonal[i] * v[i]
        c_b[i] = (q[i] * z).sum(-1, keepdim=True) - half_diagonal[i]
    if L == 0:
        return v.new_zeros(0, H, V)
    y = torch.stack(y_f) + torch.stack(y_b)
    return y / (torch.stack(c_f) + torch.stack(c_b) + eps) if normalize else y
