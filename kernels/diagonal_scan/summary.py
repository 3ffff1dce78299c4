"""The diagonal scan's transition over each sequence: the product of its a_t (PyTorch, backward by autograd).

The final state is affine in the initial one, h_final = A h_0 + h_local with A = prod_t a_t elementwise: no
logarithm, since a_t may be negative or zero. The product runs over chunks of 64 tokens, then over a sequence's
chunks. A tiny product is kept as it is, not flushed to zero as the other ops' decays are: its gradient with
respect to a tiny factor (prod of the others) can be of order one.
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, sequence_bounds


def sequence_products(a: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[N, H, D]: the product of a [B, T, H, D] over each sequence (the rows, or the documents of cu_seqlens), in
    the compute dtype of a; 1 for an empty sequence."""
    B, T, H, D = a.shape
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, a.device)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    tokens = a.reshape(B * T, H, D).to(dtype)
    valid = layout.to_chunks(torch.ones(B * T, 1, 1, dtype=torch.bool, device=a.device))
    per_chunk = torch.where(valid, layout.to_chunks(tokens), 1.0).prod(1)  # [chunks, H, D]
    return layout.to_grid(per_chunk, 1.0).prod(1)
