"""Gated linear attention, chunkwise, in Triton: forward and backward (the CUDA path).

Notation per chunk of BT=64 tokens: b = the gate's cumulative sum from the chunk's start (g_cumsum, fp32),
h = the state entering the chunk, dh = the gradient of the state leaving it, A = the chunk's lower-triangular
attention matrix (scale included). Composed of the shared stages (kernels/common) and GLA's own kernels
(triton_intra.py):
Forward:  b (chunk_cumsum) -> h per chunk (the state pass) -> A (vector gate: intra-chunk kernel) -> o (the
          output pass; a scalar gate's A is computed there).
Backward: b, h and A are recomputed rather than stored; dh per chunk (the state backward) -> dA = scale do v^T
          -> dv = A^T do + (k exp(b_last - b)) dh -> intra-chunk dq, dk -> inter-chunk dq, dk and dg.
The gate gradient needs care: d b_t = q_t dq_t - k_t dk_t, but each of those contains O(1) terms that
cancel exactly (a token's attention to itself; the chunk's last token in the state update), while the
true d g is tiny when the gates are (a_t = e^-20 gives d g ~ e^-20). So the kernels keep those terms out
of the sums instead of subtracting them afterwards: dg = reverse_cumsum(q dq_inter + q dq_offdiag
- k dk_offdiag) + exclusive_cumsum(k dk_inter) + exp(b_last) sum(h * dh).
Only exponents <= 0 are exponentiated (sub-chunks of BC=16 split exp(b_t - b_s) at a point between t
and s), so no gate value, however negative, overflows. Every call is variable-length internally (ChunkIndex,
int64 offsets); lengths are never specialized on, so new lengths reuse the compiled kernels.
"""
import torch
import triton

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.custom_ops import RecurrentOp
from kernels.common.gate_cumsum import chunk_local_cumsum
from kernels.common.intra_chunk import SUB_CHUNK_SIZE
from kernels.common.output_pass import chunk_outputs
from kernels.common.state_passes import chunk_state_grads, chunk_states
from kernels.gla.triton_intra import (chunk_bwd_dA_kernel, chunk_gla_bwd_dqk_intra_kernel,
                                      chunk_gla_bwd_dqkg_kernel, chunk_gla_bwd_dv_kernel, chunk_gla_fwd_A_kernel,
                                      chunk_scalar_bwd_dqk_intra_kernel, chunk_scalar_fwd_A_kernel)


# ---- launchers ---------------------------------------------------------------------------------------

def _tile(n: int, limit: int = 64) -> int:
    return min(limit, triton.next_power_of_2(n))


# The vector-gate intra-chunk kernels hold [BC, BC, BK] blocks: smaller K tiles keep them in registers.
INTRA_TILE = 32
# chunk_gla_bwd_dqkg_kernel loops over V next to its [BT, BK] tiles: 64-wide V tiles spill on sm_80 (32 bytes,
# scalar gate, K=128 V=64).
DQKG_V_TILE = 32


def chunk_fwd_A(q, k, b, scale, chunks: ChunkIndex, scalar: bool):
    B, T, H, K = q.shape
    A = torch.empty(B, T, H, CHUNK_SIZE, dtype=torch.float32, device=q.device)
    if scalar:
        chunk_scalar_fwd_A_kernel[(chunks.num_chunks, H)](
            q, k, b, A, chunks.cu_seqlens, chunks.chunk_indices, scale, H=H, K=K, BT=CHUNK_SIZE, BK=_tile(K))
    else:
        NC = CHUNK_SIZE // SUB_CHUNK_SIZE
        chunk_gla_fwd_A_kernel[(chunks.num_chunks, NC, H)](
            q, k, b, A, chunks.cu_seqlens, chunks.chunk_indices, scale, H=H, K=K, BT=CHUNK_SIZE, BC=SUB_CHUNK_SIZE,
            BK=_tile(K, INTRA_TILE), NC=NC)
    return A


def chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, chunks: ChunkIndex):
    scalar = g.dim() == 3
    b = chunk_local_cumsum(g, chunks)
    h, _, final = chunk_states(k, v, b, chunks, initial_state, output_final_state)
    A = None if scalar else chunk_fwd_A(q, k, b, scale, chunks, scalar)  # a scalar gate's A: in the output pass
    return chunk_outputs(q, k, v, b, h, scale, chunks, A), final


def chunk_gla_bwd(q, k, v, g, scale, initial_state, do, d_final, chunks: ChunkIndex):
    """Gradients of q, k, v, g and the initial state (None when there is none); b, h, A recomputed."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scalar = g.dim() == 3
    BK, BV = _tile(K), _tile(V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    index = dict(cu_seqlens=chunks.cu_seqlens, chunk_indices=chunks.chunk_indices)
    b = chunk_local_cumsum(g, chunks)
    h, _, _ = chunk_states(k, v, b, chunks, initial_state, False)
    A = chunk_fwd_A(q, k, b, scale, chunks, scalar)
    dh, _, d_initial = chunk_state_grads(q, k, b, do, scale, chunks, d_final, initial_state)
    dA = torch.empty(B, T, H, CHUNK_SIZE, dtype=torch.float32, device=q.device)
    chunk_bwd_dA_kernel[(chunks.num_chunks, H)](
        v, do, dA, **index, scale=scale, H=H, V=V, BT=CHUNK_SIZE, BV=BV)
    dv = torch.empty_like(v)
    chunk_gla_bwd_dv_kernel[(NV, chunks.num_chunks, H)](
        k, b, A, do, dh, dv, **index, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV, SCALAR=scalar)

    dq_intra, dk_intra, dg_intra = (torch.empty(B, T, H, K, dtype=torch.float32, device=q.device) for _ in range(3))
    if scalar:
        chunk_scalar_bwd_dqk_intra_kernel[(NK, chunks.num_chunks, H)](
            q, k, b, dA, dq_intra, dk_intra, dg_intra, **index, H=H, K=K, BT=CHUNK_SIZE, BK=BK)
    else:
        NC = CHUNK_SIZE // SUB_CHUNK_SIZE
        BKI = _tile(K, INTRA_TILE)
        chunk_gla_bwd_dqk_intra_kernel[(triton.cdiv(K, BKI), chunks.num_chunks * NC, H)](
            q, k, b, dA, dq_intra, dk_intra, dg_intra, **index, H=H, K=K, BT=CHUNK_SIZE, BC=SUB_CHUNK_SIZE, BK=BKI,
            NC=NC)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = (torch.empty(NK, *g.shape, dtype=torch.float32, device=g.device) if scalar else torch.empty_like(g))
    chunk_gla_bwd_dqkg_kernel[(NK, chunks.num_chunks, H)](
        q, k, v, b, h, do, dh, dq_intra, dk_intra, dg_intra, dq, dk, dg, **index, scale=scale, NUM_GATES=g.numel(),
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=_tile(V, DQKG_V_TILE), SCALAR=scalar)
    if scalar:
        dg = dg.sum(0).to(g.dtype)
    return dq, dk, dv, dg, d_initial


def _forward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, output_final_state):
    return chunk_gla_fwd(q, k, v, gates[0], scale, initial_state, output_final_state, chunks)


def _backward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, do, d_final_state):
    if d_final_state is not None:
        d_final_state = d_final_state.contiguous()
    dq, dk, dv, dg, d_initial = chunk_gla_bwd(q, k, v, gates[0], scale, initial_state, do, d_final_state, chunks)
    return dq, dk, dv, [dg], d_initial


gla_op = RecurrentOp("gla", _forward, _backward)  # decode: fused_recurrent.py


def prepare_inputs(q, k, v, g, scale, initial_state):
    """Contiguous inputs, the default scale and an fp32 initial state (the kernels' layout contract)."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype for the Triton kernels, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    initial_state = None if initial_state is None else initial_state.float().contiguous()
    return q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale, initial_state


def chunk_gla_triton(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    q, k, v, g, scale, initial_state = prepare_inputs(q, k, v, g, scale, initial_state)
    return gla_op(q, k, v, [g], initial_state, cu_seqlens, scale, output_final_state, False)


def chunk_gla_triton_vjp(q, k, v, g, do, scale=None, cu_seqlens=None, initial_state=None):
    """The op's backward alone; same contract as `kernels.chunk_gla_vjp`."""
    q, k, v, g, scale, initial_state = prepare_inputs(q, k, v, g, scale, initial_state)
    return gla_op.vjp(q, k, v, [g], cu_seqlens, scale, do, initial_state)
