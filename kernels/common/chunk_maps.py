"""The state summary of a delta rule (a K x K transition per chunk), in PyTorch: the composition of the
chunks' affine maps S -> F_c S + s_c over each sequence (backward by autograd).

(F2, s2) o (F1, s1) = (F2 F1, F2 s1 + s2): M is the product of the F_c, S_local the composed s, with the
final state from S_0 being M S_0 + S_local. The composition runs as a tree over the chunks, log2(chunks)
batched steps instead of one small step per chunk. Products of F shrink with the gates and with every
projection (I - beta k k^T) towards denormal numbers (some 100x slower on CPUs), so each is carried as
exp(log_scale) F', F' brought back to a largest entry in [1, 2) by a power of two (exact, and a constant for
autograd: the product does not depend on it); a factor below e^-60 is dropped (decay_or_zero).
Used by the gated delta rule (scalar gate) and KDA (per-channel gate).
"""
import math

import torch

from kernels.common.chunks import ChunkLayout
from kernels.common.contract import decay_or_zero


def compose_chunk_maps(chunk_maps: torch.Tensor, chunk_updates: torch.Tensor,
                       layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_maps F_c [chunks, H, K, K] and chunk_updates s_c [chunks, H, K, V] of the layout's chunks ->
    (S_local [N, H, K, V], M [N, H, K, K]) of each sequence (an empty one: S_local = 0, M = I)."""
    K = chunk_maps.shape[-1]
    eye = torch.eye(K, dtype=chunk_maps.dtype, device=chunk_maps.device)
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
