"""Gated linear attention one token at a time, in Triton: the decode path on CUDA.

Each program keeps a [K, BV] slice of the state in registers and walks the sequence, so a decode step
(T = 1 with the cached state) reads and writes the state once. The backward reuses the chunkwise
backward kernels: the function is the same, only the forward schedule differs.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import ChunkIndex
from kernels.gla.triton_chunk import gla_op, prepare_inputs
from kernels.tuning import autotune


# 4 warps first: one warp holding a [K = 256, 32] state slice spills (1,928 bytes on sm_90).
@autotune([triton.Config({}, num_warps=w) for w in (4, 2, 1)], key=["H", "K", "V", "SCALAR"])
@triton.jit
def fused_recurrent_gla_fwd_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale, H: tl.constexpr, K: tl.constexpr,
                                   V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                                   USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    T = tl.load(cu_seqlens + i_n + 1) - bos
    ks = tl.arange(0, BK)
    vs = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = ks < K, vs < V
    state_mask = k_ok[:, None] & v_ok[None, :]
    state_offsets = i_nh.to(tl.int64) * K * V + ks[:, None] * V + vs[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state += tl.load(h0 + state_offsets, mask=state_mask, other=0).to(tl.float32)
    for t in range(T):
        token = (bos + t) * H + i_h
        q_t = tl.load(q + token * K + ks, mask=k_ok, other=0).to(tl.float32) * scale
        k_t = tl.load(k + token * K + ks, mask=k_ok, other=0).to(tl.float32)
        v_t = tl.load(v + token * V + vs, mask=v_ok, other=0).to(tl.float32)
        if SCALAR:
            state = state * tl.exp(tl.load(g + token).to(tl.float32))
        else:
            state = state * tl.exp(tl.load(g + token * K + ks, mask=k_ok, other=0).to(tl.float32))[:, None]
        state += k_t[:, None] * v_t[None, :]
        tl.store(o + token * V + vs, tl.sum(state * q_t[:, None], 0).to(o.dtype.element_ty), mask=v_ok)
    if STORE_FINAL:
        tl.store(ht + state_offsets, state, mask=state_mask)


def fused_recurrent_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, chunks: ChunkIndex):
    """(o, final state or None), one token at a time."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    final = (torch.empty(chunks.num_sequences, H, K, V, dtype=torch.float32, device=q.device)
             if output_final_state else None)
    BV = min(32, triton.next_power_of_2(V))  # the whole K stays in one program: no partial outputs to sum
    fused_recurrent_gla_fwd_kernel[(triton.cdiv(V, BV), chunks.num_sequences * H)](
        q, k, v, g, o, initial_state, final, chunks.cu_seqlens, scale, H=H, K=K, V=V,
        BK=triton.next_power_of_2(K), BV=BV, SCALAR=g.dim() == 3, USE_H0=initial_state is not None,
        STORE_FINAL=output_final_state)
    return o, final


def _decode_forward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, output_final_state):
    return fused_recurrent_gla_fwd(q, k, v, gates[0], scale, initial_state, output_final_state, chunks)


gla_op.decode_forward = _decode_forward


def fused_recurrent_gla_triton(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    q, k, v, g, scale, initial_state = prepare_inputs(q, k, v, g, scale, initial_state)
    return gla_op(q, k, v, [g], initial_state, cu_seqlens, scale, output_final_state, True)
