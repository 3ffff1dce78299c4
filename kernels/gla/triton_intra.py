"""GLA's own part of its chunkwise Triton kernels: the intra-chunk attention matrix A (a vector gate needs a
decay per key dimension: sub-chunks of BC = 16 split exp(b_t - b_s) at a point between t and s, so only
exponents <= 0 are exponentiated), and the backward's dA, dv, intra- and inter-chunk dq, dk and dg (the
within-chunk cumulative gate is kernels/common/gate_cumsum.py's). The state and output passes are
kernels/common's (see triton_chunk.py for the composition and the gate gradient's bookkeeping).
"""
import triton
import triton.language as tl

from kernels.common.tiles import chunk_span, masked_exp
from kernels.tuning import autotune

# Three candidates per kernel (kernels/tuning.py), the heuristic config first (what trained on an H200).
WARPS_STAGES = [triton.Config({}, num_warps=4, num_stages=2), triton.Config({}, num_warps=8, num_stages=3),
                triton.Config({}, num_warps=2, num_stages=2)]


@autotune(WARPS_STAGES, key=["H", "K", "BT", "BC"])
@triton.jit
def chunk_gla_fwd_A_kernel(q, k, b, A, cu_seqlens, chunk_indices, scale, H: tl.constexpr, K: tl.constexpr,
                           BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr):
    """Rows of sub-chunk i_i of A (vector gate): blocks against earlier sub-chunks split at the sub-chunk's
    first token r (exp(b_t - b_r) exp(b_r - b_s)), the diagonal block one key at a time."""
    i_c, i_i, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    t0 = i_t * BT
    r0 = t0 + i_i * BC
    if r0 >= T:
        return
    rows = r0 + tl.arange(0, BC)
    valid = rows < T
    cols = tl.arange(0, BC)
    token = (bos + rows) * H + i_h
    a_rows = A + token[:, None] * BT
    for j in range(0, i_i):
        keys = (bos + t0 + j * BC + tl.arange(0, BC)) * H + i_h
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            ks = i_k * BK + tl.arange(0, BK)
            k_ok = ks < K
            mask = valid[:, None] & k_ok[None, :]
            q_i = tl.load(q + token[:, None] * K + ks[None, :], mask=mask, other=0)
            b_i = tl.load(b + token[:, None] * K + ks[None, :], mask=mask, other=0)
            b_r = tl.load(b + ((bos + r0) * H + i_h) * K + ks, mask=k_ok, other=0)
            k_j = tl.load(k + keys[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0)
            b_j = tl.load(b + keys[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0)
            q_decayed = q_i * masked_exp(b_i - b_r[None, :], mask)
            k_decayed = k_j * tl.exp(b_r[None, :] - b_j)
            acc += tl.dot(q_decayed.to(q_i.dtype), tl.trans(k_decayed.to(k_j.dtype)))
        tl.store(a_rows + (j * BC + cols)[None, :], acc * scale, mask=valid[:, None])
    # The diagonal block: exp(b_t - b_s) per pair and key dimension, masked before exp.
    causal = (cols[:, None] >= cols[None, :]) & valid[:, None] & valid[None, :]
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        ks = i_k * BK + tl.arange(0, BK)
        mask = valid[:, None] & (ks < K)[None, :]
        q_i = tl.load(q + token[:, None] * K + ks[None, :], mask=mask, other=0).to(tl.float32)
        k_i = tl.load(k + token[:, None] * K + ks[None, :], mask=mask, other=0).to(tl.float32)
        b_i = tl.load(b + token[:, None] * K + ks[None, :], mask=mask, other=0)
        exponent = tl.where(causal[:, :, None], b_i[:, None, :] - b_i[None, :, :], float("-inf"))
        acc += tl.sum(q_i[:, None, :] * k_i[None, :, :] * tl.exp(exponent), 2)
    tl.store(a_rows + (i_i * BC + cols)[None, :], acc * scale, mask=valid[:, None])
    for j in range(i_i + 1, NC):
        tl.store(a_rows + (j * BC + cols)[None, :], tl.zeros([BC, BC], dtype=tl.float32), mask=valid[:, None])


@autotune(WARPS_STAGES, key=["H", "K", "BT"])
@triton.jit
def chunk_scalar_fwd_A_kernel(q, k, b, A, cu_seqlens, chunk_indices, scale, H: tl.constexpr, K: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr):
    """A for a scalar gate: scale (q k^T) * exp(b_t - b_s), masked to s <= t."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    rows = i_t * BT + tl.arange(0, BT)
    valid = rows < T
    token = (bos + rows) * H + i_h
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        ks = i_k * BK + tl.arange(0, BK)
        mask = valid[:, None] & (ks < K)[None, :]
        q_tile = tl.load(q + token[:, None] * K + ks[None, :], mask=mask, other=0)
        k_tile = tl.load(k + token[:, None] * K + ks[None, :], mask=mask, other=0)
        acc += tl.dot(q_tile, tl.trans(k_tile))
    b_rows = tl.load(b + token, mask=valid, other=0)
    causal = (rows[:, None] >= rows[None, :]) & valid[:, None] & valid[None, :]
    decay = tl.exp(tl.where(causal, b_rows[:, None] - b_rows[None, :], float("-inf")))
    tl.store(A + token[:, None] * BT + tl.arange(0, BT)[None, :], acc * decay * scale, mask=valid[:, None])


@autotune(WARPS_STAGES, key=["H", "V", "BT"])
@triton.jit
def chunk_bwd_dA_kernel(v, do, dA, cu_seqlens, chunk_indices, scale, H: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BV: tl.constexpr):
    """dA = scale do v^T, masked to s <= t."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    rows = i_t * BT + tl.arange(0, BT)
    valid = rows < T
    token = (bos + rows) * H + i_h
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        vs = i_v * BV + tl.arange(0, BV)
        mask = valid[:, None] & (vs < V)[None, :]
        do_tile = tl.load(do + token[:, None] * V + vs[None, :], mask=mask, other=0)
        v_tile = tl.load(v + token[:, None] * V + vs[None, :], mask=mask, other=0)
        acc += tl.dot(do_tile, tl.trans(v_tile))
    causal = (rows[:, None] >= rows[None, :]) & valid[None, :]
    tl.store(dA + token[:, None] * BT + tl.arange(0, BT)[None, :], tl.where(causal, acc * scale, 0),
             mask=valid[:, None])


@autotune(WARPS_STAGES, key=["H", "K", "V", "BT", "SCALAR"])
@triton.jit
def chunk_gla_bwd_dv_kernel(k, b, A, do, dh, dv, cu_seqlens, chunk_indices, H: tl.constexpr, K: tl.constexpr,
                            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            SCALAR: tl.constexpr):
    """dv = A^T do + (k exp(b_last - b)) dh."""
    i_v, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_tg)
    T = eos - bos
    rows = i_t * BT + tl.arange(0, BT)
    valid = rows < T
    last = tl.minimum(i_t * BT + BT, T) - 1
    token = (bos + rows) * H + i_h
    vs = i_v * BV + tl.arange(0, BV)
    v_mask = valid[:, None] & (vs < V)[None, :]
    do_tile = tl.load(do + token[:, None] * V + vs[None, :], mask=v_mask, other=0)
    a_tile = tl.load(A + token[:, None] * BT + tl.arange(0, BT)[None, :], mask=valid[:, None], other=0)
    acc = tl.dot(tl.trans(a_tile).to(do_tile.dtype), do_tile)
    for i_k in range(tl.cdiv(K, BK)):
        ks = i_k * BK + tl.arange(0, BK)
        mask = valid[:, None] & (ks < K)[None, :]
        k_tile = tl.load(k + token[:, None] * K + ks[None, :], mask=mask, other=0)
        if SCALAR:
            to_end = tl.load(b + (bos + last) * H + i_h) - tl.load(b + token, mask=valid, other=0)
            k_decayed = tl.where(mask, k_tile * tl.exp(to_end)[:, None], 0)
        else:
            b_last = tl.load(b + ((bos + last) * H + i_h) * K + ks, mask=ks < K, other=0)
            b_rows = tl.load(b + token[:, None] * K + ks[None, :], mask=mask, other=0)
            k_decayed = tl.where(mask, k_tile * tl.exp(b_last[None, :] - b_rows), 0)
        grad = tl.load(dh + (i_tg.to(tl.int64) * H + i_h) * K * V + ks[:, None] * V + vs[None, :],
                       mask=(ks < K)[:, None] & (vs < V)[None, :], other=0)
        acc += tl.dot(k_decayed.to(k_tile.dtype), grad.to(k_tile.dtype))
    tl.store(dv + token[:, None] * V + vs[None, :], acc.to(dv.dtype.element_ty), mask=v_mask)


@autotune(WARPS_STAGES, key=["H", "K", "BT", "BC"])
@triton.jit
def chunk_gla_bwd_dqk_intra_kernel(q, k, b, dA, dq, dk, dg, cu_seqlens, chunk_indices, H: tl.constexpr,
                                   K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                                   NC: tl.constexpr):
    """Intra-chunk dq, dk (vector gate) for the tokens of sub-chunk i_i, and their share of d b without the
    diagonal terms: q dq_offdiag - k dk_offdiag (fp32)."""
    i_k, i_tc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_i = i_tc // NC, i_tc % NC
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    t0 = i_t * BT
    r0 = t0 + i_i * BC
    if r0 >= T:
        return
    cols = tl.arange(0, BC)
    rows = r0 + cols
    valid = rows < T
    token = (bos + rows) * H + i_h
    ks = i_k * BK + tl.arange(0, BK)
    k_ok = ks < K
    mask = valid[:, None] & k_ok[None, :]
    tile = token[:, None] * K + ks[None, :]
    q_i = tl.load(q + tile, mask=mask, other=0).to(tl.float32)
    k_i = tl.load(k + tile, mask=mask, other=0).to(tl.float32)
    b_i = tl.load(b + tile, mask=mask, other=0)
    da_rows = dA + token[:, None] * BT

    # Queries here, keys in earlier sub-chunks: split at this sub-chunk's first token r0.
    dq_off = tl.zeros([BC, BK], dtype=tl.float32)
    if i_i > 0:
        b_r = tl.load(b + ((bos + r0) * H + i_h) * K + ks, mask=k_ok, other=0)
        for j in range(0, i_i):
            keys = (bos + t0 + j * BC + cols) * H + i_h
            k_j = tl.load(k + keys[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0)
            b_j = tl.load(b + keys[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0)
            da = tl.load(da_rows + (j * BC + cols)[None, :], mask=valid[:, None], other=0)
            dq_off += tl.dot(da.to(k_j.dtype), (k_j * tl.exp(b_r[None, :] - b_j)).to(k_j.dtype))
        dq_off = dq_off * masked_exp(b_i - b_r[None, :], mask)
    # Keys here, queries in later sub-chunks: split at this sub-chunk's last token.
    dk_off = tl.zeros([BC, BK], dtype=tl.float32)
    later = tl.minimum(NC, tl.cdiv(T - t0, BC))  # sub-chunks that hold tokens
    if i_i + 1 < later:
        b_e = tl.load(b + ((bos + r0 + BC - 1) * H + i_h) * K + ks, mask=k_ok, other=0)
        for j in range(i_i + 1, later):
            queries = t0 + j * BC + cols
            q_valid = queries < T
            q_mask = q_valid[:, None] & k_ok[None, :]
            q_tile = (bos + queries) * H + i_h
            q_j = tl.load(q + q_tile[:, None] * K + ks[None, :], mask=q_mask, other=0)
            b_j = tl.load(b + q_tile[:, None] * K + ks[None, :], mask=q_mask, other=0)
            da = tl.load(dA + q_tile[:, None] * BT + (i_i * BC + cols)[None, :], mask=q_valid[:, None], other=0)
            q_decayed = q_j * masked_exp(b_j - b_e[None, :], q_mask)
            dk_off += tl.dot(tl.trans(da).to(q_j.dtype), q_decayed.to(q_j.dtype))
        dk_off = tl.where(mask, dk_off * tl.exp(b_e[None, :] - b_i), 0)
    # The diagonal block without the tokens themselves (added below): pairs t > s, masked before exp.
    strict = (cols[:, None] > cols[None, :]) & valid[:, None] & valid[None, :]
    da = tl.load(da_rows + (i_i * BC + cols)[None, :], mask=valid[:, None], other=0)  # dA[t, s]
    decay = tl.exp(tl.where(strict[:, :, None] & k_ok[None, None, :], b_i[:, None, :] - b_i[None, :, :],
                            float("-inf")))  # [t, s, k]
    dq_off += tl.sum(da[:, :, None] * k_i[None, :, :] * decay, 1)
    dk_off += tl.sum(da[:, :, None] * q_i[:, None, :] * decay, 0)
    diagonal = tl.load(da_rows + (i_i * BC + cols)[:, None], mask=valid[:, None], other=0)  # dA[t, t]
    tl.store(dq + tile, dq_off + diagonal * k_i, mask=mask)
    tl.store(dk + tile, dk_off + diagonal * q_i, mask=mask)
    tl.store(dg + tile, q_i * dq_off - k_i * dk_off, mask=mask)


@autotune(WARPS_STAGES, key=["H", "K", "BT"])
@triton.jit
def chunk_scalar_bwd_dqk_intra_kernel(q, k, b, dA, dq, dk, dg, cu_seqlens, chunk_indices, H: tl.constexpr,
                                      K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Intra-chunk dq, dk for a scalar gate, and q dq_offdiag - k dk_offdiag (fp32, per key dimension)."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    T = eos - bos
    cols = tl.arange(0, BT)
    rows = i_t * BT + cols
    valid = rows < T
    token = (bos + rows) * H + i_h
    ks = i_k * BK + tl.arange(0, BK)
    mask = valid[:, None] & (ks < K)[None, :]
    tile = token[:, None] * K + ks[None, :]
    q_tile = tl.load(q + tile, mask=mask, other=0)
    k_tile = tl.load(k + tile, mask=mask, other=0)
    b_rows = tl.load(b + token, mask=valid, other=0)
    da = tl.load(dA + token[:, None] * BT + cols[None, :], mask=valid[:, None], other=0)
    strict = (cols[:, None] > cols[None, :]) & valid[:, None] & valid[None, :]
    da_decayed = da * tl.exp(tl.where(strict, b_rows[:, None] - b_rows[None, :], float("-inf")))
    dq_off = tl.dot(da_decayed.to(k_tile.dtype), k_tile)
    dk_off = tl.dot(tl.trans(da_decayed).to(q_tile.dtype), q_tile)
    diagonal = tl.load(dA + token * BT + cols, mask=valid, other=0)[:, None]
    q_tile, k_tile = q_tile.to(tl.float32), k_tile.to(tl.float32)
    tl.store(dq + tile, dq_off + diagonal * k_tile, mask=mask)
    tl.store(dk + tile, dk_off + diagonal * q_tile, mask=mask)
    tl.store(dg + tile, q_tile * dq_off - k_tile * dk_off, mask=mask)


@autotune(WARPS_STAGES, key=["H", "K", "V", "BT", "SCALAR"])
@triton.jit
def chunk_gla_bwd_dqkg_kernel(q, k, v, b, h, do, dh, dq, dk, dg, dq_out, dk_out, dg_out, cu_seqlens,
                              chunk_indices, scale, NUM_GATES, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr):
    """Inter-chunk dq, dk added to the intra-chunk ones, and dg. With a scalar gate dg_out gets this K
    tile's share [NK, B, T, H] (summed over tiles afterwards), with a vector gate the [B, T, H, K] values."""
    i_k, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_tg)
    T = eos - bos
    rows = i_t * BT + tl.arange(0, BT)
    valid = rows < T
    last = tl.minimum(i_t * BT + BT, T) - 1
    token = (bos + rows) * H + i_h
    ks = i_k * BK + tl.arange(0, BK)
    mask = valid[:, None] & (ks < K)[None, :]
    tile = token[:, None] * K + ks[None, :]
    dq_inter = tl.zeros([BT, BK], dtype=tl.float32)
    dk_inter = tl.zeros([BT, BK], dtype=tl.float32)
    d_last = tl.zeros([BK], dtype=tl.float32)  # sum_v h * dh: the gradient of the chunk's total decay
    for i_v in range(tl.cdiv(V, BV)):
        vs = i_v * BV + tl.arange(0, BV)
        v_mask = valid[:, None] & (vs < V)[None, :]
        state_mask = (ks < K)[:, None] & (vs < V)[None, :]
        state_offsets = (i_tg.to(tl.int64) * H + i_h) * K * V + ks[:, None] * V + vs[None, :]
        do_tile = tl.load(do + token[:, None] * V + vs[None, :], mask=v_mask, other=0)
        v_tile = tl.load(v + token[:, None] * V + vs[None, :], mask=v_mask, other=0)
        state = tl.load(h + state_offsets, mask=state_mask, other=0)
        grad = tl.load(dh + state_offsets, mask=state_mask, other=0)
        dq_inter += tl.dot(do_tile, tl.trans(state).to(do_tile.dtype))
        dk_inter += tl.dot(v_tile, tl.trans(grad).to(v_tile.dtype))
        d_last += tl.sum(state * grad, 1)
    if SCALAR:
        b_rows = tl.load(b + token, mask=valid, other=0)[:, None]
        b_last = tl.load(b + (bos + last) * H + i_h)
    else:
        b_rows = tl.load(b + tile, mask=mask, other=0)
        b_last = tl.load(b + ((bos + last) * H + i_h) * K + ks, mask=ks < K, other=0)[None, :]
    dq_inter *= tl.exp(b_rows) * scale
    dk_inter = tl.where(mask, dk_inter * tl.exp(b_last - b_rows), 0)
    q_tile = tl.load(q + tile, mask=mask, other=0).to(tl.float32)
    k_tile = tl.load(k + tile, mask=mask, other=0).to(tl.float32)
    tl.store(dq_out + tile, (tl.load(dq + tile, mask=mask, other=0) + dq_inter).to(dq_out.dtype.element_ty), mask=mask)
    tl.store(dk_out + tile, (tl.load(dk + tile, mask=mask, other=0) + dk_inter).to(dk_out.dtype.element_ty), mask=mask)
    # d g_u = sum_{t>=u} (q dq_inter + q dq_offdiag - k dk_offdiag)_t + sum_{s<u} (k dk_inter)_s + d(total decay).
    # The last token's k dk_inter cancels against the total decay's share exactly, so it is left out of both.
    from_later = tl.load(dg + tile, mask=mask, other=0) + q_tile * dq_inter
    from_earlier = tl.where((rows == last)[:, None], 0, k_tile * dk_inter)
    grad_g = tl.cumsum(from_later, axis=0, reverse=True) + tl.cumsum(from_earlier, axis=0) - from_earlier
    if SCALAR:
        grad_g = tl.sum(tl.where(mask, grad_g, 0), 1) + tl.sum(d_last) * tl.exp(b_last)
        tl.store(dg_out + i_k * NUM_GATES + token, grad_g, mask=valid)
    else:
        grad_g = grad_g + (d_last[None, :] * tl.exp(b_last))
        tl.store(dg_out + tile, grad_g.to(dg_out.dtype.element_ty), mask=mask)
