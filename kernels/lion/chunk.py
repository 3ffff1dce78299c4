"""LION's chunkwise and recurrent forms from the causal GLA ops, run forward and on the reversed sequences.

    o^F = chunk_gla(q, k, [v | 1], g)                        (the [v | 1] column accumulates z, the normaliser)
    o^B = reverse(chunk_gla(reverse(q), reverse(k), reverse([v | 1]), reverse(h)))   h_i = g_{i+1} (sequences.py)
    y   = o^F + o^B - scale (q . k) [v | 1]                  (the diagonal counted once)
    normalised (LION): y[:V] / (y[V] + eps);  plain (bidirectional GLA / Mamba2, no [v | 1]): y

The chunked op's blocks within a chunk are the lower triangle of Q K^T (.) M, its states the blocks below it; the
reversed run gives the upper triangle: together the whole of kernels/lion/full.py's matrix, in linear time and
memory. chunk_gla is Triton on CUDA and chunked PyTorch elsewhere, and differentiable either way, so the backward
is autograd through the two calls. The recurrent form is the same with fused_recurrent_gla: a state of H x K x
(V + 1) per direction whatever the length (inference on long inputs).
"""
import torch

from kernels.gla import chunk_gla, fused_recurrent_gla
from kernels.lion.sequences import backward_gates, reverse_sequences


def with_normalizer(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: one more value column, whose output is q . z (the row sum of the masked scores)."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def combine_directions(o_forward: torch.Tensor, o_backward: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, scale: float, normalize: bool, eps: float) -> torch.Tensor:
    """y from both directions' outputs (each including token i's own k_i v_i^T) with the diagonal once; v is the
    value the ops saw ([v | 1] when normalising). fp32 (fp64 stays fp64), returned in v's dtype."""
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    diagonal = scale * (q.to(dtype) * k.to(dtype)).sum(-1, keepdim=True) * v.to(dtype)
    y = o_forward.to(dtype) + o_backward.to(dtype) - diagonal
    if normalize:
        y = y[..., :-1] / (y[..., -1:] + eps)
    return y.to(v.dtype)


def zero_gate(q: torch.Tensor) -> torch.Tensor:
    """LION-LIT's log decay: 0 per head and token (a scalar gate), fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.zeros(q.shape[:3], dtype=dtype, device=q.device)


def _bidirectional(op, q, k, v, g, scale, cu_seqlens, normalize, eps):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = zero_gate(q) if g is None else g
    values = with_normalizer(v) if normalize else v
    o_forward, _ = op(q, k, values, g, scale=scale, cu_seqlens=cu_seqlens)
    rev = lambda x: reverse_sequences(x, cu_seqlens)  # noqa: E731
    o_backward, _ = op(rev(q), rev(k), rev(values), rev(backward_gates(g, cu_seqlens)), scale=scale,
                       cu_seqlens=cu_seqlens)
    return combine_directions(o_forward, rev(o_backward), q, k, values, scale, normalize, eps)


def chunk_lion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
               scale: float | None = None, cu_seqlens: torch.Tensor | None = None, normalize: bool = True,
               eps: float = 1e-6) -> torch.Tensor:
    """The chunkwise form (training). q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K], [B, T, H] or None (no
    decay); with cu_seqlens B = 1. Returns y [B, T, H, V] in v's dtype."""
    return _bidirectional(chunk_gla, q, k, v, g, scale, cu_seqlens, normalize, eps)


def recurrent_lion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                   scale: float | None = None, cu_seqlens: torch.Tensor | None = None, normalize: bool = True,
                   eps: float = 1e-6) -> torch.Tensor:
    """The RNN form (inference on long inputs): chunk_lion's contract, a token at a time in each direction."""
    return _bidirectional(fused_recurrent_gla, q, k, v, g, scale, cu_seqlens, normalize, eps)
