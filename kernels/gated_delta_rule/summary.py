"""The gated delta rule's state summary of each sequence, in PyTorch (CPU and CUDA; backward by autograd).

The final state is affine in the initial one, S_final = M S_0 + S_local. With the WY factors of the chunk
kernel (chunk.py's wy_system, whose inverse T gives W and U there) each chunk maps the state S -> F_c S + s_c:
    F_c = exp(gamma_C) I - k_to_end W,    s_c = k_to_end U,
and a sequence's summary is their composition, (F2, s2) o (F1, s1) = (F2 F1, F2 s1 + s2): M is the product
of the F_c, S_local the composed s. No outputs: nothing involving q (no intra-chunk attention, no output
from the states). The composition runs as a tree over the chunks, log2(chunks) batched steps instead of
one small step per chunk. Products of F shrink with the gates and with every projection (I - beta k k^T)
towards denormal numbers (some 100x slower on CPUs), so each is carried as exp(log_scale) F', F' brought
back to a largest entry in [1, 2) by a power of two (exact, and a constant for autograd: the product does
not depend on it); a factor below e^-60 is dropped (decay_or_zero).
"""
import math

import torch

from kernels.common import chunk_layout, compute_dtype, decay_or_zero, sequence_bounds
from kernels.gated_delta_rule.chunk import CHUNK_SIZE, wy_system


def gated_delta_rule_state_summary_torch(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = k.shape
    dtype = compute_dtype(k, v, g, beta)
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype)).transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0: an identity step.
    k, v, g, beta = (chunked(x) for x in (k, v, g, beta))
    gamma, _, system, k_to_end = wy_system(k, g, beta)
    # k_to_end T (T = system^-1) by one triangular solve for its K rows, rather than T itself and then
    # W = T diag(beta exp(gamma)) K and U = T diag(beta) V: F_c = exp(gamma_C) I - (k_to_end T) diag(..) K.
    k_to_end_T = torch.linalg.solve_triangular(system, k_to_end, upper=False, left=False, unitriangular=True)
    eye = torch.eye(K, dtype=dtype, device=k.device)
    chunk_maps = gamma[..., -1, None, None].exp() * eye - k_to_end_T @ (k * (beta * gamma.exp())[..., None])
    chunk_updates = k_to_end_T @ (v * beta[..., None])  # [chunks, H, K, V]

    # [N, slots] grid of the chunks' maps, slots a power of two; slots past a sequence's end are identities.
    slots = 1 << max(layout.max_chunks - 1, 0).bit_length()

    def grid(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = layout.to_grid(x, fill)
        return torch.cat([x, x.new_full((x.shape[0], slots - x.shape[1], *x.shape[2:]), fill)], dim=1)

    empty = grid(chunk_maps.new_zeros(layout.num_chunks, 1, 1, 1), 1.0)
    maps, log_scale = _normalized(grid(chunk_maps, 0.0) + empty * eye, 0.0)
    updates = grid(chunk_updates, 0.0)
    while maps.shape[1] > 1:  # compose neighbours: (later, earlier) -> later o earlier
        # unbind, not [:, 0::2]: a strided slice's backward would write a full-size zero gradient.
        (map_1, map_2), (update_1, update_2), (log_1, log_2) = (
            x.unflatten(1, (-1, 2)).unbind(2) for x in (maps, updates, log_scale))
        updates = map_2 @ update_1 * decay_or_zero(log_2) + update_2
        maps, log_scale = _normalized(map_2 @ map_1, log_1 + log_2)
    return updates[:, 0], decay_or_zero(log_scale[:, 0]) * maps[:, 0]


def _normalized(maps: torch.Tensor, log_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps', log_scale') with exp(log_scale') maps' == exp(log_scale) maps and each [K, K] map's largest
    entry in [1, 2) (zero maps stay zero)."""
    largest = maps.detach().abs().amax((-2, -1), keepdim=True)
    exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)), 0.0)
    return maps * torch.exp2(-exponent), log_scale + exponent * math.log(2)
