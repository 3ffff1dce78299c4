"""Chunkwise KDA in Triton: forward and backward, chunk size 64 (the math is in chunk.py).

Composed of the shared stages (kernels/common) and KDA's own kernels (triton_wy.py):
  forward   gamma (gate_cumsum) -> A, M (intra) -> WY factors W, U -> state pass (V_new = U - W S, the
            states; the vector gate's decays) -> output pass (A given)
  backward  gamma, A, M, WY factors and states recomputed (never kept from the forward) -> state backward
            (dS per chunk, dV_new = A^T dO + ...) -> sums over V -> sums over keys (dq's, dk's terms) -> dM, dbeta
            -> A's and M's pairs (dq, dk) -> dg
Every call is variable-length internally (ChunkIndex): a [B, T] batch is B sequences of T tokens over the
flattened tokens. Each sequence starts a fresh chunk; loads past a sequence's end read zeros (k = v = beta =
g = 0), which leave the state unchanged, and every decay there is masked before exp.
`python -m bench.gpu_compile` compiles such kernels for sm_80/90/100 without a GPU (kernels/compile_check.py).
"""
import torch
import triton

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.custom_ops import RecurrentOp
from kernels.common.gate_cumsum import chunk_local_cumsum
from kernels.common.intra_chunk import SUB_CHUNK_SIZE
from kernels.common.output_pass import chunk_outputs
from kernels.common.state_passes import block_size, check_key_dim, chunk_state_grads, chunk_states, dot_precision
from kernels.kda.triton_wy import (_bwd_dg_kernel, _bwd_intra_kernel, _bwd_k_kernel, _bwd_q_kernel, _bwd_v_kernel,
                                   _bwd_wy_kernel, _intra_kernel, _wy_kernel)

NUM_SUB_CHUNKS = CHUNK_SIZE // SUB_CHUNK_SIZE
# The sub-chunk kernels hold [BC, BC, BK] blocks and the sums over keys [BT, BT] factors next to [BT, BK]
# tiles: keys in blocks of 32 keep both in registers.
INTRA_KEY_BLOCK = 32


def _factors(q, k, v, g, beta, scale, chunks: ChunkIndex, store_t: bool):
    """(gamma, A, M, W, U, T or None) of every chunk, fp32, over [tokens, H, ...] inputs (g [B, T, H, K])."""
    TT, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    g_cumsum = chunk_local_cumsum(g, chunks).view(TT, H, K)
    A, M = (torch.empty(TT, H, CHUNK_SIZE, **f32) for _ in range(2))
    w = torch.empty(TT, H, K, **f32)
    u = torch.empty(TT, H, V, **f32)
    t_inv = torch.empty(TT, H, CHUNK_SIZE, **f32) if store_t else None
    if chunks.num_chunks:
        index = (chunks.cu_seqlens, chunks.chunk_indices)
        _intra_kernel[(chunks.num_chunks, NUM_SUB_CHUNKS, H)](
            q, k, g_cumsum, A, M, scale, *index, H=H, K=K, BT=CHUNK_SIZE, BC=SUB_CHUNK_SIZE,
            BK=block_size(K, INTRA_KEY_BLOCK), NC=NUM_SUB_CHUNKS, DOT_PRECISION=dot_precision(k))
        _wy_kernel[(chunks.num_chunks, H)](
            k, v, beta, g_cumsum, M, w, u, t_inv, *index, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K),
            STORE_T=store_t, DOT_PRECISION=dot_precision(k))
    return g_cumsum, A, M, w, u, t_inv


def chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks: ChunkIndex):
    """Forward on [B, T, ...] inputs; returns (o, final_state or None)."""
    B, T, H, V = v.shape
    q, k, v, beta = _flatten(q, k, v, beta)
    g_cumsum, A, _, w, u, _ = _factors(q, k, v, g.contiguous(), beta, scale, chunks, store_t=False)
    h, v_new, final_state = chunk_states(k, u, g_cumsum, chunks, initial_state, output_final_state, w=w)
    o = chunk_outputs(q, k, v_new, g_cumsum, h, scale, chunks, A=A, out_dtype=v.dtype)
    return o.view(B, T, H, V), final_state


def chunk_kda_bwd(q, k, v, g, beta, scale, initial_state, chunks: ChunkIndex, do, d_final_state):
    """Gradients (dq, dk, dv, dg, dbeta, d_initial_state or None) of the op at these inputs, recomputing the
    chunk states from the inputs. d_final_state may be None (no gradient flows into the final state)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    precision = dot_precision(q)
    q, k, v, beta, do = _flatten(q, k, v, beta, do)
    g_cumsum, A, M, w, u, t_inv = _factors(q, k, v, g.contiguous(), beta, scale, chunks, store_t=True)
    h, v_new, _ = chunk_states(k, u, g_cumsum, chunks, initial_state, False, w=w)
    dh, dv_new, d_h0 = chunk_state_grads(q, k, g_cumsum, do, scale, chunks, d_final_state, initial_state, w=w, A=A)
    dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
    dg = torch.empty(g_cumsum.shape, dtype=g.dtype, device=g.device)
    if chunks.num_chunks:
        f32 = dict(dtype=torch.float32, device=k.device)
        TT = k.shape[0]
        da, dt_u, dt, dm = (torch.empty(TT, H, CHUNK_SIZE, **f32) for _ in range(4))
        dq_part, dk_part, dg_q, dg_k, dgamma = (torch.empty(TT, H, K, **f32) for _ in range(5))
        dbeta_v, dbeta_part = (torch.empty(TT, H, **f32) for _ in range(2))
        grid, index = (chunks.num_chunks, H), (chunks.cu_seqlens, chunks.chunk_indices)
        keys = dict(K=K, BK=block_size(K, INTRA_KEY_BLOCK))
        _bwd_v_kernel[grid](v, beta, t_inv, v_new, dv_new, do, dv, da, dt_u, dbeta_v, scale, *index,
                            H=H, V=V, BT=CHUNK_SIZE, DOT_PRECISION=precision)
        _bwd_q_kernel[grid](q, k, beta, g_cumsum, h, dv_new, do, dt_u, dq_part, dg_q, dt, scale, *index, H=H, V=V,
                            BT=CHUNK_SIZE, DOT_PRECISION=precision, **keys)
        _bwd_k_kernel[grid](k, beta, g_cumsum, t_inv, h, dh, v_new, dv_new, dbeta_v, dk_part, dg_k, dbeta_part, *index,
                            H=H, V=V, BT=CHUNK_SIZE, DOT_PRECISION=precision, **keys)
        _bwd_wy_kernel[grid](beta, t_inv, M, dt, dbeta_part, dm, dbeta, *index, H=H, BT=CHUNK_SIZE,
                             DOT_PRECISION=precision)
        key_grid = (triton.cdiv(K, keys["BK"]), chunks.num_chunks)
        _bwd_intra_kernel[(key_grid[0], chunks.num_chunks * NUM_SUB_CHUNKS, H)](
            q, k, g_cumsum, da, dm, dq_part, dk_part, dq, dk, dgamma, *index, H=H, BT=CHUNK_SIZE, BC=SUB_CHUNK_SIZE,
            NC=NUM_SUB_CHUNKS, DOT_PRECISION=precision, **keys)
        _bwd_dg_kernel[(*key_grid, H)](dgamma, dg_q, dg_k, dg, *index, H=H, BT=CHUNK_SIZE, **keys)
    if d_h0 is not None:
        d_h0 = d_h0.to(initial_state.dtype)
    return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), dg.view(B, T, H, K),
            dbeta.view(B, T, H), d_h0)


def _flatten(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, H, ...] -> contiguous [B*T, H, ...]: the kernels index tokens of the flattened batch."""
    return [x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous() for x in xs]


def _forward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, output_final_state):
    g, beta = gates
    initial_state = initial_state.contiguous() if initial_state is not None else None
    return chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks)


def _backward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, do, d_final_state):
    g, beta = gates
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if d_final_state is not None:
        d_final_state = d_final_state.contiguous()
    dq, dk, dv, dg, dbeta, d_h0 = chunk_kda_bwd(q, k, v, g, beta, scale, initial_state, chunks, do, d_final_state)
    return dq, dk, dv, [dg, dbeta], d_h0


kda_op = RecurrentOp("kda", _forward, _backward)  # decode: fused_recurrent.py


def chunk_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton chunkwise KDA; same contract as `kernels.kda.chunk_kda`."""
    check_key_dim(k.shape[-1])
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return kda_op(q, k, v, [g, beta], initial_state, cu_seqlens, scale, output_final_state, False)


def chunk_kda_triton_vjp(q, k, v, g, beta, do, scale=None, cu_seqlens=None, initial_state=None):
    """The op's backward alone; same contract as `kernels.kda.chunk_kda_vjp`."""
    check_key_dim(k.shape[-1])
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return kda_op.vjp(q, k, v, [g, beta], cu_seqlens, scale, do, initial_state)
