"""The gates' cumulative sum within each chunk (Triton), the first stage of every gated chunkwise op whose
gate is not summed inside its own kernels (GLA, scalar or vector gate; KDA's per-channel gate): fp32, from
each chunk's first token, so every decay within a chunk is exp of a difference of these sums.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.tiles import chunk_span


@triton.jit
def chunk_cumsum_kernel(g, b, cu_seqlens, chunk_indices, H: tl.constexpr, S: tl.constexpr,
                        BT: tl.constexpr, BS: tl.constexpr):
    """b = cumulative sum of g within each chunk; g is [B, T, H, S] (S = K, or 1 for a scalar gate)."""
    i_s, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    rows = i_t * BT + tl.arange(0, BT)
    cols = i_s * BS + tl.arange(0, BS)
    mask = (rows < T)[:, None] & (cols < S)[None, :]
    offsets = ((bos + rows) * H + i_h)[:, None] * S + cols[None, :]
    x = tl.load(g + offsets, mask=mask, other=0).to(tl.float32)
    tl.store(b + offsets, tl.cumsum(x, axis=0), mask=mask)


def chunk_local_cumsum(g: torch.Tensor, chunks: ChunkIndex) -> torch.Tensor:
    H = g.shape[2]
    S = g.shape[3] if g.dim() == 4 else 1
    b = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    BS = min(64, triton.next_power_of_2(S))
    chunk_cumsum_kernel[(triton.cdiv(S, BS), chunks.num_chunks, H)](
        g, b, chunks.cu_seqlens, chunks.chunk_indices, H=H, S=S, BT=CHUNK_SIZE, BS=BS)
    return b
