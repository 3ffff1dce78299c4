"""The delta rule's own part of its chunkwise Triton kernels: the WY factors and their backward.

Per chunk of BT = 64 tokens and head, with g_cumsum (gamma) the within-chunk cumulative sum of the log gate:
  `_wy_kernel`: A = strictly lower beta_i (k_i . k_j) exp(gamma_i - gamma_j), T = (I + A)^{-1}
  (kernels/common/tiles.py's unit_lower_inverse), W = T diag(beta exp(gamma)) K, U = T diag(beta) V. The
  state and output passes (kernels/common) then give V_new = U - W S, the states and O.
The intra-chunk backward is four kernels, each holding few of the chunk's [BT, BT] factors in registers at
once (one kernel holding them all spilled hundreds of bytes of registers on sm_80): the sums over V, the sums
over keys, the WY factors' dA, then dk. The factors pass between them in fp32 scratch ([tokens, H, BT]), as do
the partial sums of dbeta and dgamma ([tokens, H]); every kernel writes fresh buffers and never rewrites one
it reads (the autotuner launches each many times on the same arguments).
Intermediates are fp32; dot operands are cast to the inputs' dtype (bf16 tensor cores), fp32 inputs use exact
fp32 dots. Keys come in blocks of 64 (32 in the intra-chunk backward, whose [BT, BT] factors leave too few
registers for [BT, 64] blocks on sm_80).
"""
import triton
import triton.language as tl

from kernels.common.state_passes import CONFIGS
from kernels.common.tiles import (chunk_rows, decay, dot, load_block, load_scalar_cumsum, state_block, store_block,
                                  unit_lower_inverse)
from kernels.tuning import autotune

WARPS_STAGES = [triton.Config({}, num_warps=8, num_stages=1), triton.Config({}, num_warps=4, num_stages=2)]  # no V


@autotune(CONFIGS, key=["H", "K", "V", "STORE_T"])
@triton.jit
def _wy_kernel(
    k, v, g, beta, g_cumsum, w, u, t_inv, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=valid, other=0.0).to(tl.float32), axis=0)
    tl.store(g_cumsum + rows * H + i_h, b_g, mask=valid)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = load_block(k, rows, valid, i_k * BK + tl.arange(0, BK), H, K, i_h)
        b_kk += dot(b_k, tl.trans(b_k), DT, DOT_PRECISION)

    strictly_lower = o_i[:, None] > o_i[None, :]
    b_a = b_beta[:, None] * b_kk * decay(b_g, strictly_lower)
    b_t = unit_lower_inverse(b_a, BT, DOT_PRECISION)  # T = (I + A)^{-1}
    if STORE_T:
        store_block(t_inv, b_t, rows, valid, o_i, H, BT, i_h)

    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_w = dot(b_t, load_block(k, rows, valid, cols_k, H, K, i_h) * (b_beta * tl.exp(b_g))[:, None], DT,
                   DOT_PRECISION)
        store_block(w, b_w, rows, valid, cols_k, H, K, i_h)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_u = dot(b_t, load_block(v, rows, valid, cols_v, H, V, i_h) * b_beta[:, None], DT, DOT_PRECISION)
        store_block(u, b_u, rows, valid, cols_v, H, V, i_h)


@autotune(CONFIGS, key=["H", "V"])
@triton.jit
def _intra_bwd_v_kernel(
    v, beta, g_cumsum, t_inv, v_new, dv_new, do, dv, dqk, dt, dbeta_part, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The sums over V, one block of V at a time: dv; dQK = scale (dO V_new^T * decay); dT's U term,
    dU (beta V)^T with dU = dV_new; dbeta's V term."""
    DT = v.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)  # T enters dots only: in their operand dtype
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_dqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_v = load_block(v, rows, valid, cols_v, H, V, i_h)
        b_dvn = load_block(dv_new, rows, valid, cols_v, H, V, i_h)
        b_dqk += dot(load_block(do, rows, valid, cols_v, H, V, i_h),
                      tl.trans(load_block(v_new, rows, valid, cols_v, H, V, i_h)), DT, DOT_PRECISION)
        b_dt += dot(b_dvn, tl.trans(b_v * b_beta[:, None]), DT, DOT_PRECISION)
        b_dvb = dot(tl.trans(b_t), b_dvn, DT, DOT_PRECISION)  # d(beta V) = T^T dU
        store_block(dv, b_dvb * b_beta[:, None], rows, valid, cols_v, H, V, i_h)
        b_dbeta += tl.sum(b_dvb * b_v, axis=1)
    b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
    store_block(dqk, b_dqk * decay(b_g, o_i[:, None] >= o_i[None, :]) * scale, rows, valid, o_i, H, BT, i_h)
    store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)
    tl.store(dbeta_part + rows * H + i_h, b_dbeta, mask=valid)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _intra_bwd_k_kernel(
    q, k, beta, g_cumsum, h, dv_new, do, dq, dqk, dt_u, dt, dgamma_part, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The sums over keys, one block of keys at a time: dq of the output O = scale (exp(g_cumsum) Q S + (Q K^T *
    decay) V_new), dT = its U term (dt_u) + its W term dW (beta exp(gamma) K)^T with dW = -dV_new S^T, and
    dgamma's output terms. Gate gradients take only the pairs i > j, each +m_ij to gamma_i and -m_ij to gamma_j: the
    diagonal (exp(0)) and the last token's decay to the chunk end are constants, and summing their O(1) terms
    with opposite signs would swamp dg when the gates are tiny."""
    DT = q.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    strictly_lower = o_i[:, None] > o_i[None, :]
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
    b_exp = tl.exp(b_g)
    b_dqk = load_block(dqk, rows, valid, o_i, H, BT, i_h)
    b_dt = load_block(dt_u, rows, valid, o_i, H, BT, i_h)
    b_dgamma = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = load_block(q, rows, valid, cols_k, H, K, i_h)
        b_k = load_block(k, rows, valid, cols_k, H, K, i_h)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            b_dq += dot(load_block(do, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_dw -= dot(load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
        b_dq = b_dq * (scale * b_exp)[:, None]
        b_dgamma += tl.sum(b_q * b_dq, axis=1)
        b_dq += dot(b_dqk, b_k, DT, DOT_PRECISION)
        store_block(dq, b_dq, rows, valid, cols_k, H, K, i_h)
        b_m = tl.where(strictly_lower, b_dqk * dot(b_q, tl.trans(b_k), DT, DOT_PRECISION), 0.0)
        b_dgamma += tl.sum(b_m, axis=1) - tl.sum(b_m, axis=0)
        b_dt += dot(b_dw, tl.trans(b_k * (b_beta * b_exp)[:, None]), DT, DOT_PRECISION)
    store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)
    tl.store(dgamma_part + rows * H + i_h, b_dgamma, mask=valid)


@autotune(WARPS_STAGES, key=["H", "K"])
@triton.jit
def _intra_bwd_wy_kernel(
    k, beta, g_cumsum, t_inv, dt, da, dbeta_v, dgamma_k, dbeta_part, dgamma_part, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The WY factors' gradient: V_new = U - W S, W = T diag(beta exp(g_cumsum)) K, U = T diag(beta) V and
    T = (I + A)^{-1} give dA = -T^T dT T^T; then dA's terms of dbeta and dgamma, with K K^T summed over the
    key blocks."""
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)
    b_dt = load_block(dt, rows, valid, o_i, H, BT, i_h)
    b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
    b_da = -dot(dot(tl.trans(b_t), b_dt, DT, DOT_PRECISION), tl.trans(b_t), DT, DOT_PRECISION)
    b_da = b_da * decay(b_g, o_i[:, None] > o_i[None, :])  # dA * exp(gamma_i - gamma_j): d(beta_i k_i . k_j)
    store_block(da, b_da, rows, valid, o_i, H, BT, i_h)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = load_block(k, rows, valid, i_k * BK + tl.arange(0, BK), H, K, i_h)
        b_kk += dot(b_k, tl.trans(b_k), DT, DOT_PRECISION)
    b_da_kk = b_da * b_kk
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_da_a = b_da_kk * b_beta[:, None]  # dA * A
    b_dbeta = tl.load(dbeta_v + rows * H + i_h, mask=valid, other=0.0) + tl.sum(b_da_kk, axis=1)
    b_dgamma = tl.load(dgamma_k + rows * H + i_h, mask=valid, other=0.0)
    b_dgamma += tl.sum(b_da_a, axis=1) - tl.sum(b_da_a, axis=0)
    tl.store(dbeta_part + rows * H + i_h, b_dbeta, mask=valid)
    tl.store(dgamma_part + rows * H + i_h, b_dgamma, mask=valid)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _intra_bwd_dk_kernel(
    q, k, beta, g_cumsum, t_inv, h, dh, v_new, dv_new, dqk, da, dbeta_part, dgamma_part, dk, dbeta, dg,
    cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk, key block by key block, from the output's and the state hand-off's terms (dS from the chunk's end)
    and the WY factors'; then dbeta and dg whole."""
    DT = q.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)
    b_dqk = load_block(dqk, rows, valid, o_i, H, BT, i_h).to(DT)  # from here on only dot operands
    b_da = load_block(da, rows, valid, o_i, H, BT, i_h).to(DT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_g, b_g_last = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
    b_exp = tl.exp(b_g)
    b_dbeta = tl.load(dbeta_part + rows * H + i_h, mask=valid, other=0.0)
    b_dgamma = tl.load(dgamma_part + rows * H + i_h, mask=valid, other=0.0)
    # dW = -dV_new S^T is recomputed: a [tokens, H, K] scratch buffer would cost more memory traffic.
    b_h_dh = tl.zeros([BK], dtype=tl.float32)  # rows of S * dS, summed over V
    b_k_dk_state = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = load_block(q, rows, valid, cols_k, H, K, i_h)
        b_k = load_block(k, rows, valid, cols_k, H, K, i_h)
        b_dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # V_new dS^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            p, m = state_block(dh, i_c, i_h, cols_k, cols_v, H, K, V)
            b_dh = tl.load(p, mask=m, other=0.0)
            b_dk_state += dot(load_block(v_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_dh), DT,
                               DOT_PRECISION)
            b_dw -= dot(load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_h_dh += tl.sum(b_h * b_dh, axis=1)
        b_dk_state = b_dk_state * tl.exp(b_g_last - b_g)[:, None]
        b_k_dk_state += tl.sum(b_k * b_dk_state, axis=1)
        b_dkb = dot(tl.trans(b_t), b_dw, DT, DOT_PRECISION)  # d(beta exp(g_cumsum) K) = T^T dW
        b_dk = dot(tl.trans(b_dqk), b_q, DT, DOT_PRECISION) + b_dk_state + b_dkb * (b_beta * b_exp)[:, None]
        b_dk += dot(b_da, b_k, DT, DOT_PRECISION) * b_beta[:, None]
        b_dk += dot(tl.trans(b_da), b_k * b_beta[:, None], DT, DOT_PRECISION)
        store_block(dk, b_dk, rows, valid, cols_k, H, K, i_h)
        b_dkb_k = tl.sum(b_dkb * b_k, axis=1)
        b_dbeta += b_dkb_k * b_exp
        b_dgamma += b_dkb_k * b_beta * b_exp
    # g_t enters gamma_s for every s >= t of the chunk, gamma_C (all t), and gamma_C - gamma_j for j < t.
    later = o_i[None, :] >= o_i[:, None]  # [t, s]: s >= t
    b_dg = tl.sum(tl.where(later, b_dgamma[None, :], 0.0), axis=1)
    b_dg += tl.exp(b_g_last) * tl.sum(b_h_dh)
    b_dg += tl.sum(tl.where(later, 0.0, b_k_dk_state[None, :]), axis=1)

    tl.store(dbeta + rows * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=valid)
    tl.store(dg + rows * H + i_h, b_dg.to(dg.dtype.element_ty), mask=valid)
