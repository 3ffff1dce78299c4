"""KDA's own part of its chunkwise Triton kernels: the intra-chunk matrices with a decay per key channel, the
WY factors, and their backward. The math is chunk.py's; the state and output passes are kernels/common's.

Per chunk of BT = 64 tokens and head, with gamma = g_cumsum the within-chunk cumulative log decay [BT, K]:
  `_intra_kernel`: A_ts = scale sum_c q_tc k_sc exp(gamma_tc - gamma_sc) (s <= t: the output pass's matrix)
  and M_ts = sum_c k_tc k_sc exp(gamma_tc - gamma_sc) (s < t), by sub-chunks of BC = 16: against an earlier
  sub-chunk the decay is split at the first token r of the query's sub-chunk, exp(gamma_t - gamma_r)
  exp(gamma_r - gamma_s), both factors <= 1; the diagonal sub-chunk exponentiates the masked pairwise
  differences. No exponent is ever positive, so no gate, however negative, overflows.
  `_wy_kernel`: T = (I + diag(beta) M)^{-1} (unit_lower_inverse), W = T diag(beta) (K exp(gamma)),
  U = T diag(beta) V.
The backward, after the state backward (dh: the gradient of the state leaving each chunk; dV_new):
  `_bwd_v_kernel`   sums over V: dv, dbeta's V term, dT's U term, dA = scale dO V_new^T (s <= t);
  `_bwd_q_kernel`   sums over keys against the state S entering the chunk: dq's state term, dT's W term
                    (dW = -dV_new S^T);
  `_bwd_k_kernel`   dk's state hand-off and W terms (dW recomputed), dbeta's W term (the kernels holding T
                    apart from the one accumulating dT: together they spilled registers on sm_80);
  (both also give the gate gradient's terms that are not pairwise, below)
  `_bwd_wy_kernel`  dM = diag(beta) (-T^T dT T^T) below the diagonal, dbeta whole;
  `_bwd_intra_kernel` the pairwise terms of A and M (sub-chunks again): dq, dk whole, and d gamma's pairs;
  `_bwd_dg_kernel`  dg = the reverse cumulative sum of d gamma within the chunk, plus the rest.
The gate gradient keeps out every term that is zero by construction rather than summing O(1) terms that
cancel (a token's own decay exp(0); the last token's decay to the chunk end): with r_t the gamma_t terms
(q_t dq_t of the state term, the W factors' k_t exp(gamma_t), A's and M's pairs s != t) and c_t = k_t dk_t of
the state hand-off (exp(gamma_C - gamma_t)), dg_u = sum_{t >= u} r_t + sum_{t < u} c_t + exp(gamma_C) sum_V
S * dS. Intermediates are fp32 scratch, passed between kernels; every kernel writes fresh buffers and never
rewrites one it reads (the autotuner launches each many times on the same arguments). Dot operands are cast
to the inputs' dtype (bf16 tensor cores), fp32 inputs use exact fp32 dots.
"""
import triton
import triton.language as tl

from kernels.common.state_passes import CONFIGS
from kernels.common.tiles import (chunk_rows, chunk_span, dot, load_block, masked_exp, state_block, store_block,
                                  unit_lower_inverse)
from kernels.tuning import autotune

WARPS_STAGES = [triton.Config({}, num_warps=4, num_stages=2), triton.Config({}, num_warps=8, num_stages=1),
                triton.Config({}, num_warps=2, num_stages=2)]  # kernels without a V block


@autotune(WARPS_STAGES, key=["H", "K"])
@triton.jit
def _intra_kernel(
    q, k, g_cumsum, A, M, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows of sub-chunk i_i of A (scale included, s <= t) and M (s < t); zeros right of the diagonal block."""
    DT = k.dtype.element_ty
    i_c, i_i, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    start = bos + i_t * BT
    r0 = start + i_i * BC
    if r0 >= eos:
        return
    cols = tl.arange(0, BC)
    rows = r0 + cols
    valid = rows < eos
    for j in range(0, i_i):  # keys in an earlier sub-chunk (every one of its tokens valid)
        keys = start + j * BC + cols
        b_qk = tl.zeros([BC, BC], dtype=tl.float32)
        b_kk = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            cols_k = i_k * BK + tl.arange(0, BK)
            mask = valid[:, None] & (cols_k < K)[None, :]
            b_r = tl.load(g_cumsum + (r0 * H + i_h) * K + cols_k, mask=cols_k < K, other=0.0)
            b_from_r = masked_exp(load_block(g_cumsum, rows, valid, cols_k, H, K, i_h) - b_r[None, :], mask)
            b_kj = load_block(k, keys, keys < eos, cols_k, H, K, i_h)
            b_kj = b_kj * tl.exp(b_r[None, :] - load_block(g_cumsum, keys, keys < eos, cols_k, H, K, i_h))
            b_qk += dot(load_block(q, rows, valid, cols_k, H, K, i_h) * b_from_r, tl.trans(b_kj), DT, DOT_PRECISION)
            b_kk += dot(load_block(k, rows, valid, cols_k, H, K, i_h) * b_from_r, tl.trans(b_kj), DT, DOT_PRECISION)
        store_block(A, b_qk * scale, rows, valid, j * BC + cols, H, BT, i_h)
        store_block(M, b_kk, rows, valid, j * BC + cols, H, BT, i_h)
    # The diagonal block: exp(gamma_t - gamma_s) per pair and key channel, masked before exp.
    causal = (cols[:, None] >= cols[None, :]) & valid[:, None] & valid[None, :]
    strict = causal & (cols[:, None] > cols[None, :])
    b_qk = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = load_block(q, rows, valid, cols_k, H, K, i_h).to(tl.float32)
        b_k = load_block(k, rows, valid, cols_k, H, K, i_h).to(tl.float32)
        b_g = load_block(g_cumsum, rows, valid, cols_k, H, K, i_h)
        b_decay = tl.exp(tl.where(causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf")))
        b_qk += tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_decay, 2)
        b_kk += tl.sum(tl.where(strict[:, :, None], b_k[:, None, :] * b_k[None, :, :] * b_decay, 0.0), 2)
    store_block(A, b_qk * scale, rows, valid, i_i * BC + cols, H, BT, i_h)
    store_block(M, b_kk, rows, valid, i_i * BC + cols, H, BT, i_h)
    for j in range(i_i + 1, NC):
        store_block(A, tl.zeros([BC, BC], dtype=tl.float32), rows, valid, j * BC + cols, H, BT, i_h)
        store_block(M, tl.zeros([BC, BC], dtype=tl.float32), rows, valid, j * BC + cols, H, BT, i_h)


@autotune(CONFIGS, key=["H", "K", "V", "STORE_T"])
@triton.jit
def _wy_kernel(
    k, v, beta, g_cumsum, M, w, u, t_inv, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """T = (I + diag(beta) M)^{-1}, W = T diag(beta) (K exp(gamma)), U = T diag(beta) V."""
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_a = tl.where(o_i[:, None] > o_i[None, :], load_block(M, rows, valid, o_i, H, BT, i_h) * b_beta[:, None], 0.0)
    b_t = unit_lower_inverse(b_a, BT, DOT_PRECISION)
    if STORE_T:
        store_block(t_inv, b_t, rows, valid, o_i, H, BT, i_h)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_decay = tl.exp(load_block(g_cumsum, rows, valid, cols_k, H, K, i_h))  # from the chunk's start: <= 1
        b_kb = load_block(k, rows, valid, cols_k, H, K, i_h) * b_decay * b_beta[:, None]
        store_block(w, dot(b_t, b_kb, DT, DOT_PRECISION), rows, valid, cols_k, H, K, i_h)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_u = dot(b_t, load_block(v, rows, valid, cols_v, H, V, i_h) * b_beta[:, None], DT, DOT_PRECISION)
        store_block(u, b_u, rows, valid, cols_v, H, V, i_h)


@autotune(CONFIGS, key=["H", "V"])
@triton.jit
def _bwd_v_kernel(
    v, beta, t_inv, v_new, dv_new, do, dv, da, dt, dbeta_part, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The sums over V, one block of V at a time: dv = beta T^T dU (dU = dV_new); dbeta's V term; dT's U
    term dU (beta V)^T; dA = scale dO V_new^T on s <= t (the gradient of A / scale)."""
    DT = v.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)  # T enters dots only: in their operand dtype
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_v = load_block(v, rows, valid, cols_v, H, V, i_h)
        b_dvn = load_block(dv_new, rows, valid, cols_v, H, V, i_h)
        b_da += dot(load_block(do, rows, valid, cols_v, H, V, i_h),
                    tl.trans(load_block(v_new, rows, valid, cols_v, H, V, i_h)), DT, DOT_PRECISION)
        b_dt += dot(b_dvn, tl.trans(b_v * b_beta[:, None]), DT, DOT_PRECISION)
        b_dvb = dot(tl.trans(b_t), b_dvn, DT, DOT_PRECISION)  # d(beta V) = T^T dU
        store_block(dv, b_dvb * b_beta[:, None], rows, valid, cols_v, H, V, i_h)
        b_dbeta += tl.sum(b_dvb * b_v, axis=1)
    store_block(da, tl.where(o_i[:, None] >= o_i[None, :], b_da * scale, 0.0), rows, valid, o_i, H, BT, i_h)
    store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)
    tl.store(dbeta_part + rows * H + i_h, b_dbeta, mask=valid)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _bwd_q_kernel(
    q, k, beta, g_cumsum, h, dv_new, do, dt_u, dq_part, dg_q, dt, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The sums over keys of the state S entering the chunk, one block of keys at a time: dq's state term
    scale (dO S^T) exp(gamma) and its share of dg, rev_cumsum(q dq); dT = its U term + dW (beta K exp(gamma))^T
    with dW = -dV_new S^T."""
    DT = q.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_dt = load_block(dt_u, rows, valid, o_i, H, BT, i_h)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            b_dq += dot(load_block(do, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_dw -= dot(load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
        b_from_start = tl.exp(load_block(g_cumsum, rows, valid, cols_k, H, K, i_h))
        b_dq = b_dq * b_from_start * scale
        b_kb = load_block(k, rows, valid, cols_k, H, K, i_h) * b_from_start * b_beta[:, None]  # W's right factor
        b_dt += dot(b_dw, tl.trans(b_kb), DT, DOT_PRECISION)
        store_block(dq_part, b_dq, rows, valid, cols_k, H, K, i_h)
        b_q_dq = load_block(q, rows, valid, cols_k, H, K, i_h) * b_dq
        store_block(dg_q, tl.cumsum(b_q_dq, axis=0, reverse=True), rows, valid, cols_k, H, K, i_h)
    store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _bwd_k_kernel(
    k, beta, g_cumsum, t_inv, h, dh, v_new, dv_new, dbeta_v, dk_part, dg_k, dbeta_part, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk's terms but A's and M's pairs, one block of keys at a time: the state hand-off's
    (V_new dS^T) exp(gamma_C - gamma) (dS of the state leaving the chunk) and the W factors' beta exp(gamma)
    T^T dW (dW = -dV_new S^T recomputed: a [tokens, H, K] scratch buffer would cost more memory traffic);
    dbeta's W term; dg's share rev_cumsum(beta k exp(gamma) T^T dW) + exclusive_cumsum(k dk_state) +
    exp(gamma_C) sum_V S dS."""
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_dbeta = tl.load(dbeta_v + rows * H + i_h, mask=valid, other=0.0)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # V_new dS^T
        b_h_dh = tl.zeros([BK], dtype=tl.float32)  # rows of S * dS, summed over V
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            p, m = state_block(dh, i_c, i_h, cols_k, cols_v, H, K, V)
            b_dh = tl.load(p, mask=m, other=0.0)
            b_dw -= dot(load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_dk += dot(load_block(v_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_dh), DT, DOT_PRECISION)
            b_h_dh += tl.sum(b_h * b_dh, axis=1)
        b_k = load_block(k, rows, valid, cols_k, H, K, i_h)
        b_g = load_block(g_cumsum, rows, valid, cols_k, H, K, i_h)
        b_g_last = tl.load(g_cumsum + (last * H + i_h) * K + cols_k, mask=cols_k < K, other=0.0)
        b_dk = b_dk * masked_exp(b_g_last[None, :] - b_g, valid[:, None] & (cols_k < K)[None, :])
        b_kd = b_k * tl.exp(b_g)  # K exp(gamma)
        b_dkb = dot(tl.trans(b_t), b_dw, DT, DOT_PRECISION)  # d(beta K exp(gamma)) = T^T dW
        b_dbeta += tl.sum(b_kd * b_dkb, axis=1)
        store_block(dk_part, b_dk + b_dkb * tl.exp(b_g) * b_beta[:, None], rows, valid, cols_k, H, K, i_h)
        # The last token's hand-off reaches no later token: left out, not cancelled (cumsum - itself) against
        # its O(1) value, which would swamp the others when the gates are tiny.
        b_k_dk = tl.where((rows == last)[:, None], 0.0, b_k * b_dk)
        b_dg = tl.cumsum(b_kd * b_beta[:, None] * b_dkb, axis=0, reverse=True) + tl.cumsum(b_k_dk, axis=0) - b_k_dk
        store_block(dg_k, b_dg + (tl.exp(b_g_last) * b_h_dh)[None, :], rows, valid, cols_k, H, K, i_h)
    tl.store(dbeta_part + rows * H + i_h, b_dbeta, mask=valid)


@autotune(WARPS_STAGES, key=["H"])
@triton.jit
def _bwd_wy_kernel(
    beta, t_inv, M, dt, dbeta_part, dm, dbeta, cu_seqlens, chunk_indices,
    H: tl.constexpr, BT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """T = (I + diag(beta) M)^{-1} gives d(diag(beta) M) = -T^T dT T^T below the diagonal: dM = diag(beta)
    of it, and dbeta's last term, its rows summed against M. Dots of the fp32 factors (tf32 for bf16 inputs)."""
    DT = t_inv.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = load_block(t_inv, rows, valid, o_i, H, BT, i_h)
    b_dt = load_block(dt, rows, valid, o_i, H, BT, i_h)
    b_da = -dot(dot(tl.trans(b_t), b_dt, DT, DOT_PRECISION), tl.trans(b_t), DT, DOT_PRECISION)
    b_da = tl.where(o_i[:, None] > o_i[None, :], b_da, 0.0)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_dbeta = tl.load(dbeta_part + rows * H + i_h, mask=valid, other=0.0)
    b_dbeta += tl.sum(b_da * load_block(M, rows, valid, o_i, H, BT, i_h), axis=1)
    store_block(dm, b_da * b_beta[:, None], rows, valid, o_i, H, BT, i_h)
    tl.store(dbeta + rows * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=valid)


@autotune(WARPS_STAGES, key=["H", "K"])
@triton.jit
def _bwd_intra_kernel(
    q, k, g_cumsum, da, dm, dq_part, dk_part, dq, dk, dgamma, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """A's and M's pairwise terms for the tokens of sub-chunk i_i (one key block), split as in _intra_kernel:
    dq and dk whole (the partial sums of _bwd_k_kernel added), and d gamma's pairs s != t:
    q_t dq_t - k_s dk_s of A, k_t dk_t - k_s dk_s of M (as the token t's query and the token s's key)."""
    DT = k.dtype.element_ty
    i_k, i_cc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_i = i_cc // NC, i_cc % NC
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    start = bos + i_t * BT
    r0 = start + i_i * BC
    if r0 >= eos:
        return
    cols = tl.arange(0, BC)
    rows = r0 + cols
    valid = rows < eos
    cols_k = i_k * BK + tl.arange(0, BK)
    k_ok = cols_k < K
    mask = valid[:, None] & k_ok[None, :]
    b_q = load_block(q, rows, valid, cols_k, H, K, i_h).to(tl.float32)
    b_k = load_block(k, rows, valid, cols_k, H, K, i_h).to(tl.float32)
    b_g = load_block(g_cumsum, rows, valid, cols_k, H, K, i_h)

    # Tokens here as queries, keys in earlier sub-chunks: split at this sub-chunk's first token r0.
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)  # A's
    b_dk_query = tl.zeros([BC, BK], dtype=tl.float32)  # M's, k_t in the query's place
    if i_i > 0:
        b_r = tl.load(g_cumsum + (r0 * H + i_h) * K + cols_k, mask=k_ok, other=0.0)
        for j in range(0, i_i):
            keys = start + j * BC + cols
            b_kj = load_block(k, keys, keys < eos, cols_k, H, K, i_h)
            b_kj = b_kj * tl.exp(b_r[None, :] - load_block(g_cumsum, keys, keys < eos, cols_k, H, K, i_h))
            b_dq += dot(load_block(da, rows, valid, j * BC + cols, H, BT, i_h), b_kj, DT, DOT_PRECISION)
            b_dk_query += dot(load_block(dm, rows, valid, j * BC + cols, H, BT, i_h), b_kj, DT, DOT_PRECISION)
        b_from_r = masked_exp(b_g - b_r[None, :], mask)
        b_dq = b_dq * b_from_r
        b_dk_query = b_dk_query * b_from_r
    # Tokens here as keys, queries (of A, and keys of M) in later sub-chunks: split at this sub-chunk's last
    # token (valid: a later sub-chunk holds tokens).
    b_dk_key = tl.zeros([BC, BK], dtype=tl.float32)
    later = tl.minimum(NC, tl.cdiv(eos - start, BC))  # sub-chunks that hold tokens
    if i_i + 1 < later:
        b_e = tl.load(g_cumsum + ((r0 + BC - 1) * H + i_h) * K + cols_k, mask=k_ok, other=0.0)
        for j in range(i_i + 1, later):
            queries = start + j * BC + cols
            q_valid = queries < eos
            b_to_e = masked_exp(load_block(g_cumsum, queries, q_valid, cols_k, H, K, i_h) - b_e[None, :],
                                q_valid[:, None] & k_ok[None, :])
            b_qj = load_block(q, queries, q_valid, cols_k, H, K, i_h) * b_to_e
            b_kj = load_block(k, queries, q_valid, cols_k, H, K, i_h) * b_to_e
            b_dk_key += dot(tl.trans(load_block(da, queries, q_valid, i_i * BC + cols, H, BT, i_h)), b_qj, DT,
                            DOT_PRECISION)
            b_dk_key += dot(tl.trans(load_block(dm, queries, q_valid, i_i * BC + cols, H, BT, i_h)), b_kj, DT,
                            DOT_PRECISION)
        b_dk_key = b_dk_key * masked_exp(b_e[None, :] - b_g, mask)
    # The diagonal block without the tokens themselves: pairs t > s, masked before exp.
    strict = (cols[:, None] > cols[None, :]) & valid[:, None] & valid[None, :]
    b_decay = tl.exp(tl.where(strict[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf")))  # [t, s, k]
    b_da = load_block(da, rows, valid, i_i * BC + cols, H, BT, i_h)  # [t, s]
    b_dm = load_block(dm, rows, valid, i_i * BC + cols, H, BT, i_h)
    b_dq += tl.sum(b_da[:, :, None] * b_k[None, :, :] * b_decay, 1)
    b_dk_query += tl.sum(b_dm[:, :, None] * b_k[None, :, :] * b_decay, 1)
    b_dk_key += tl.sum((b_da[:, :, None] * b_q[:, None, :] + b_dm[:, :, None] * b_k[:, None, :]) * b_decay, 0)
    b_self = tl.sum(tl.where(cols[:, None] == cols[None, :], b_da, 0.0), axis=1)[:, None]  # dA[t, t]: exp(0)
    store_block(dq, load_block(dq_part, rows, valid, cols_k, H, K, i_h) + b_dq + b_self * b_k, rows, valid,
                cols_k, H, K, i_h)
    store_block(dk, load_block(dk_part, rows, valid, cols_k, H, K, i_h) + b_dk_query + b_dk_key + b_self * b_q,
                rows, valid, cols_k, H, K, i_h)
    store_block(dgamma, b_q * b_dq + b_k * b_dk_query - b_k * b_dk_key, rows, valid, cols_k, H, K, i_h)


@triton.jit
def _bwd_dg_kernel(
    dgamma, dg_q, dg_k, dg, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """dg = the pairs' d gamma summed from each token to the chunk's end (g_u enters gamma_t for t >= u), plus
    the shares of _bwd_q_kernel and _bwd_k_kernel."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols_k = i_k * BK + tl.arange(0, BK)
    b_dg = tl.cumsum(load_block(dgamma, rows, valid, cols_k, H, K, i_h), axis=0, reverse=True)
    b_dg += load_block(dg_q, rows, valid, cols_k, H, K, i_h) + load_block(dg_k, rows, valid, cols_k, H, K, i_h)
    store_block(dg, b_dg, rows, valid, cols_k, H, K, i_h)
