"""The mLSTM one token at a time in Triton: a decode step in one launch on CUDA (forward only).

Each program keeps a [K, BV] slice of the memory C~ in registers, with the normaliser n~ [K] and the stabiliser
m (every program of a head computes those two, the first one stores them), and walks its sequence through the
xLSTM step of naive.py: m_t = max(f_t + m_{t-1}, i_t), C~ and n~ decayed by exp(f_t + m_{t-1} - m_t) and written
with exp(i_t - m_t) (both <= 1), h_t = C~^T q / max(|n~ . q|, exp(-m_t)). A decode step (T = 1 from the cached
state) reads and writes the state [K, V+2] once. It has no backward: calls that need gradients take the GLA form
(kernels/mlstm/gla_form.py), whose result it equals.
"""
import torch
import triton
import triton.language as tl

from kernels.common import chunk_index
from kernels.gla.triton_chunk import prepare_inputs  # the Triton ops' layout contract
from kernels.tuning import autotune


# 4 warps first, as GLA's fused recurrent kernel (one warp holding a wide state slice spills).
@autotune([triton.Config({}, num_warps=w) for w in (4, 2, 1)], key=["H", "K", "V"])
@triton.jit
def fused_recurrent_mlstm_fwd_kernel(q, k, v, i, f, o, h0, ht, cu_seqlens, scale, H: tl.constexpr,
                                     K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                     USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    T = tl.load(cu_seqlens + i_n + 1) - bos
    ks = tl.arange(0, BK)
    vs = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = ks < K, vs < V
    rows = i_nh.to(tl.int64) * K * (V + 2) + ks * (V + 2)  # each state row: V memory columns, n~, m
    memory_mask = k_ok[:, None] & v_ok[None, :]
    memory = tl.zeros([BK, BV], dtype=tl.float32)
    normaliser = tl.zeros([BK], dtype=tl.float32)
    m = tl.sum(tl.zeros([1], dtype=tl.float32), 0)  # the empty state's stabiliser, 0
    if USE_H0:
        memory += tl.load(h0 + rows[:, None] + vs[None, :], mask=memory_mask, other=0).to(tl.float32)
        normaliser += tl.load(h0 + rows + V, mask=k_ok, other=0).to(tl.float32)
        m += tl.load(h0 + i_nh.to(tl.int64) * K * (V + 2) + V + 1).to(tl.float32)  # row 0's (every row's)
    for t in range(T):
        token = (bos + t) * H + i_h
        q_t = tl.load(q + token * K + ks, mask=k_ok, other=0).to(tl.float32) * scale
        k_t = tl.load(k + token * K + ks, mask=k_ok, other=0).to(tl.float32)
        v_t = tl.load(v + token * V + vs, mask=v_ok, other=0).to(tl.float32)
        i_t = tl.load(i + token).to(tl.float32)
        f_t = tl.load(f + token).to(tl.float32)
        m_new = tl.maximum(f_t + m, i_t)
        forget, write = tl.exp(f_t + m - m_new), tl.exp(i_t - m_new)
        memory = memory * forget + (write * k_t)[:, None] * v_t[None, :]
        normaliser = normaliser * forget + write * k_t
        m = m_new
        denominator = tl.maximum(tl.abs(tl.sum(normaliser * q_t, 0)), tl.exp(-m))
        h = tl.sum(memory * q_t[:, None], 0) / denominator
        tl.store(o + token * V + vs, h.to(o.dtype.element_ty), mask=v_ok)
    if STORE_FINAL:
        tl.store(ht + rows[:, None] + vs[None, :], memory, mask=memory_mask)
        if i_v == 0:
            tl.store(ht + rows + V, normaliser, mask=k_ok)
            tl.store(ht + rows + V + 1, tl.zeros([BK], dtype=tl.float32) + m, mask=k_ok)


def fused_recurrent_mlstm_triton(q, k, v, i, f, scale=None, initial_state=None, output_final_state=False,
                                 cu_seqlens=None):
    """(o [B, T, H, V] in v's dtype, final state [N, H, K, V+2] fp32 or None); chunk_mlstm's contract, no
    gradients."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, i, scale, initial_state = prepare_inputs(q, k, v, i, scale, initial_state)
    f = f.contiguous()
    chunks = chunk_index(cu_seqlens, B, T, q.device)
    o = torch.empty_like(v)
    final = (torch.empty(chunks.num_sequences, H, K, V + 2, dtype=torch.float32, device=q.device)
             if output_final_state else None)
    BV = min(32, triton.next_power_of_2(V))  # the whole K in one program: the normaliser's sum is complete
    fused_recurrent_mlstm_fwd_kernel[(triton.cdiv(V, BV), chunks.num_sequences * H)](
        q, k, v, i, f, o, initial_state, final, chunks.cu_seqlens, scale, H=H, K=K, V=V,
        BK=triton.next_power_of_2(K), BV=BV, USE_H0=initial_state is not None, STORE_FINAL=output_final_state)
    return o, final
