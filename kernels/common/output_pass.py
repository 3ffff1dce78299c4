"""The output pass, shared by every chunkwise op (Triton): per chunk and block of V, all chunks in parallel,

    o = scale (q exp(g)) S + A v,    A = scale (q k^T * exp(g_t - g_s)) over s <= t

with S the state entering the chunk (kernels.common.state_passes) and v the values (V_new for the delta rule).
A scalar gate's A is computed here (one [BT, BT] decay); a vector gate's needs a decay per key dimension and
comes precomputed (GLA's intra-chunk kernel).
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.state_passes import CONFIGS, KEY_BLOCK, block_size, dot_precision
from kernels.common.tiles import chunk_rows, decay, dot, load_block, load_scalar_cumsum, load_state, store_block
from kernels.tuning import autotune


@autotune(CONFIGS, key=["H", "K", "V", "VECTOR_GATE"])
@triton.jit
def output_kernel(
    q, k, v, g_cumsum, h, A, o, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    VECTOR_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DT = q.dtype.element_ty
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = load_block(q, rows, valid, cols_k, H, K, i_h)
        b_h = load_state(h, i_c, i_h, cols_k, cols_v, H, K, V)
        if VECTOR_GATE:
            b_o += dot(b_q * tl.exp(load_block(g_cumsum, rows, valid, cols_k, H, K, i_h)), b_h, DT, DOT_PRECISION)
        else:
            b_o += dot(b_q, b_h, DT, DOT_PRECISION)
            b_qk += dot(b_q, tl.trans(load_block(k, rows, valid, cols_k, H, K, i_h)), DT, DOT_PRECISION)
    if VECTOR_GATE:
        b_o = b_o * scale
        b_a = load_block(A, rows, valid, o_i, H, BT, i_h)
    else:
        b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
        b_o = b_o * (scale * tl.exp(b_g))[:, None]
        b_a = b_qk * decay(b_g, o_i[:, None] >= o_i[None, :]) * scale
    b_o += dot(b_a, load_block(v, rows, valid, cols_v, H, V, i_h), DT, DOT_PRECISION)
    store_block(o, b_o, rows, valid, cols_v, H, V, i_h)


def chunk_outputs(q, k, v, g_cumsum, h, scale: float, chunks: ChunkIndex, A=None, out_dtype=None) -> torch.Tensor:
    """o [tokens, H, V] from [tokens, H, ...] inputs (A [tokens, H, BT] with a vector gate), in out_dtype
    (default: v's)."""
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    vector_gate = g_cumsum.dim() == q.dim()
    o = torch.empty(v.shape, dtype=out_dtype or v.dtype, device=v.device)
    if chunks.num_chunks:
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_chunks, H)  # noqa: E731
        output_kernel[grid](
            q, k, v, g_cumsum, h, A, o, scale, chunks.cu_seqlens, chunks.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, KEY_BLOCK), VECTOR_GATE=vector_gate,
            DOT_PRECISION=dot_precision(q),
        )
    return o
