"""Chunkwise gated delta rule in Triton: forward and backward, chunk size 64 (the math is in chunk.py).

Forward, per chunk of 64 tokens and head:
  1. `_wy_kernel` (all chunks in parallel): gamma = within-chunk cumsum of g, A = strictly lower
     beta_i (k_i . k_j) exp(gamma_i - gamma_j), T = (I + A)^{-1} by block forward substitution (16x16
     blocks), W = T diag(beta exp(gamma)) K, U = T diag(beta) V.
  2. `_state_fwd_kernel` (sequential over chunks, parallel over sequences x heads x V blocks): stores the state
     entering every chunk, V_new = U - W S, and S <- exp(gamma_C) S + (exp(gamma_C - gamma) K)^T V_new.
  3. `_output_kernel` (all chunks in parallel): O = scale (exp(gamma) Q S + (Q K^T * decay, causal) V_new).
Backward: recompute 1 and 2 (states are recomputed, never kept from the forward), then
  4. `_state_bwd_kernel` (sequential, reverse): dV_new = scale (Q K^T * decay)^T dO + exp(gamma_C - gamma) K dS,
     stores dS at every chunk end, dS <- exp(gamma_C) dS + scale (exp(gamma) Q)^T dO - W^T dV_new; the last dS is
     d initial_state. The gradient of final_state seeds dS.
  5. `_intra_bwd_kernel` (all chunks in parallel): dq and dv from the chunk's S, V_new and dV_new, and the
     WY factors' gradients (dT = dW (beta exp(gamma) K)^T + dU (beta V)^T, dA = -T^T dT T^T) into scratch;
  6. `_intra_bwd_dk_kernel` (all chunks in parallel): dk, dbeta and dg from them, S, dS and V_new. One kernel
     for 5 and 6 held every [64, 64] factor at once and spilled registers.

Every call is variable-length internally: a [B, T] batch is B sequences of length T over the flattened
tokens, so one set of kernels serves cu_seqlens and plain batches. Each sequence starts a fresh chunk; loads
past a sequence's end read zeros (k = v = beta = g = 0), which leave the state unchanged. Exponents are only
ever of differences gamma_i - gamma_j with j <= i (or masked before exp): no overflow for any gate.
Intermediates (gamma, W, U, T, states, V_new and their gradients) are fp32; dot operands are cast to the
inputs' dtype (bf16 tensor cores), fp32 inputs use exact fp32 dots. All dims are blocked to at least 16
(tl.dot's minimum). Keys come in blocks of BK = 64 (registers hold [64, 64] and [64, BV] tiles, never a
[64, K] one, so K = 256 does not spill): the state kernels keep the state as up to four [64, BV] key blocks
(K <= 256), the others loop over key blocks (of 32 in the intra-chunk backward). V is in blocks of BV
(autotuned, among the configs that fit the device's shared memory: kernels/tuning.py).
`python -m bench.gpu_compile` compiles them for sm_80/90/100 without a GPU and reports registers, spills and
shared memory. Plain pointers (no block pointers) so the kernels run in the
interpreter and on triton 3.6.
"""
import functools

import torch
import triton
import triton.language as tl

from kernels.common import prepare_chunk_indices, prepare_chunk_offsets, sequence_bounds
from kernels.tuning import autotune

CHUNK_SIZE = 64


# V blocks of 32, 16 and 64 columns (16 keeps the state kernels' four [64, BV] key blocks in registers on
# sm_80 at K = 256), safest first: the interpreter runs the first, the compile check stops at the first
# that fits unspilled.
CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (32, 16, 64) for w in (8, 4)
           for s in (1, 2, 3)]
WARPS_STAGES = [triton.Config({}, num_warps=w, num_stages=s) for w in (8, 4) for s in (1, 2, 3)]  # no V blocks


@triton.jit
def _load_block(ptr, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h):
    """[len(rows), len(cols)] block of a [tokens, H, D] tensor for head i_h, zeros outside. In the tensor's dtype:
    bf16 blocks take half the registers, and every use is a dot operand (in that dtype) or a product with an
    fp32 value (promoted, exactly, to fp32)."""
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + (rows[:, None] * H + i_h) * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_block(ptr, value, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h):
    mask = row_mask[:, None] & (cols[None, :] < D)
    tl.store(ptr + (rows[:, None] * H + i_h) * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_block(ptr, i_state, i_h, rows_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of the [len(rows_k), len(cols_v)] block of state i_state, head i_h, in a [*, H, K, V]
    tensor."""
    base = (i_state.to(tl.int64) * H + i_h) * K * V
    return ptr + base + rows_k[:, None] * V + cols_v[None, :], (rows_k[:, None] < K) & (cols_v[None, :] < V)


@triton.jit
def _chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """Token rows of global chunk i_c, their validity mask, and the row of the chunk's last valid token."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    start = tl.load(cu_seqlens + i_n).to(tl.int64) + tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64) * BT
    rows = start + tl.arange(0, BT)
    return rows, rows < eos, tl.minimum(start + BT, eos) - 1


@triton.jit
def _load_gamma(gamma, rows, valid, last, H: tl.constexpr, i_h):
    """Cumulative gates of a chunk's rows and of its last valid row. Rows past the sequence's end continue
    the cumsum with g = 0 (as in _wy_kernel): a 0 there would make exp(gamma_i - gamma_j) overflow."""
    b_gamma_last = tl.load(gamma + last * H + i_h)
    b_gamma = tl.load(gamma + rows * H + i_h, mask=valid, other=0.0)
    return tl.where(valid, b_gamma, b_gamma_last), b_gamma_last


@triton.jit
def _decay(gamma, mask):
    """exp(gamma_i - gamma_j) where mask (j <= i there, so the exponent is <= 0), else 0."""
    return tl.exp(tl.where(mask, gamma[:, None] - gamma[None, :], float("-inf")))


@triton.jit
def _dot(a, b, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with operands in the inputs' dtype (tensor cores for bf16), accumulated in fp32."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=DOT_PRECISION)


@autotune(CONFIGS, key=["H", "K", "V", "STORE_T"])
@triton.jit
def _wy_kernel(
    k, v, g, beta, gamma, w, u, t_inv, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, _ = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_gamma = tl.cumsum(tl.load(g + rows * H + i_h, mask=valid, other=0.0).to(tl.float32), axis=0)
    tl.store(gamma + rows * H + i_h, b_gamma, mask=valid)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = _load_block(k, rows, valid, i_k * BK + tl.arange(0, BK), H, K, i_h)
        b_kk += _dot(b_k, tl.trans(b_k), DT, DOT_PRECISION)

    strictly_lower = o_i[:, None] > o_i[None, :]
    b_a = b_beta[:, None] * b_kk * _decay(b_gamma, strictly_lower)
    # T = (I + A)^{-1}. First the 16x16 diagonal blocks D by forward substitution, the four blocks side by side
    # (row i of every block at once): with X = D - I, X_r = -A_r - sum_{j<r} A_rj X_j. X is block-diagonal, so
    # the rows i of the four blocks summed are one [BT] row holding each block's row in its own columns, and
    # X_r's sum is an exact fp32 vector-matrix product (a [BT, BT] fp32 dot here would hold whole operand rows
    # and columns in registers). Then, with L the blocks of A below the diagonal, I + A = (I + A_diag)(I + D L)
    # and N = D L has N^4 = 0, so T = (I + N)^{-1} D = (I - N)(I + N^2) D: the same sums as block forward
    # substitution, in four dots of the inputs' precision (exact fp32 for fp32 inputs; tf32 tensor cores for
    # bf16 inputs, whose products with T are bf16 dots anyway).
    same_block = (o_i // 16)[:, None] == (o_i // 16)[None, :]
    b_x = -tl.where(same_block, b_a, 0.0)
    for i in range(1, 16):
        rows_i = (o_i % 16 == i)[:, None]
        b_row = tl.sum(tl.where(rows_i, b_x, 0.0), axis=0)
        b_x = tl.where(rows_i & same_block, (b_row + tl.sum(b_row[:, None] * b_x, axis=0))[None, :], b_x)
    b_d = b_x + (o_i[:, None] == o_i[None, :]).to(tl.float32)
    b_n = tl.dot(b_d, tl.where(same_block, 0.0, b_a), input_precision=DOT_PRECISION)
    b_y = b_d + tl.dot(tl.dot(b_n, b_n, input_precision=DOT_PRECISION), b_d, input_precision=DOT_PRECISION)
    b_t = b_y - tl.dot(b_n, b_y, input_precision=DOT_PRECISION)
    if STORE_T:
        _store_block(t_inv, b_t, rows, valid, o_i, H, BT, i_h)

    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_w = _dot(b_t, _load_block(k, rows, valid, cols_k, H, K, i_h) * (b_beta * tl.exp(b_gamma))[:, None], DT,
                   DOT_PRECISION)
        _store_block(w, b_w, rows, valid, cols_k, H, K, i_h)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_u = _dot(b_t, _load_block(v, rows, valid, cols_v, H, V, i_h) * b_beta[:, None], DT, DOT_PRECISION)
        _store_block(u, b_u, rows, valid, cols_v, H, V, i_h)


@triton.jit
def _load_state(ptr, i_state, i_h, i_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr):
    """Key block i_k ([BK, len(cols_v)], fp32) of state i_state, head i_h, of a [*, H, K, V] tensor."""
    p, m = _state_block(ptr, i_state, i_h, i_k * BK + tl.arange(0, BK), cols_v, H, K, V)
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, value, i_state, i_h, i_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr):
    p, m = _state_block(ptr, i_state, i_h, i_k * BK + tl.arange(0, BK), cols_v, H, K, V)
    tl.store(p, value.to(p.dtype.element_ty), mask=m)


@triton.jit
def _key_block(ptr, rows, valid, i_k, H: tl.constexpr, K: tl.constexpr, i_h, BK: tl.constexpr):
    """Key block i_k ([len(rows), BK], fp32) of a [tokens, H, K] tensor."""
    return _load_block(ptr, rows, valid, i_k * BK + tl.arange(0, BK), H, K, i_h)


# The state kernels keep a [K, BV] state in registers as up to four [BK = 64, BV] key blocks (b_h1..b_h4, as
# flash-linear-attention's kernels do): K <= 256. Blocks past K are never touched (K is a constexpr).
@autotune(CONFIGS, key=["H", "K", "V", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def _state_fwd_kernel(
    k, w, u, gamma, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DT = k.dtype.element_ty
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n)
    cols_v = i_v * BV + tl.arange(0, BV)

    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h1 += _load_state(initial_state, i_n, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            b_h2 += _load_state(initial_state, i_n, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            b_h3 += _load_state(initial_state, i_n, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            b_h4 += _load_state(initial_state, i_n, i_h, 3, cols_v, H, K, V, BK)
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        i_state = first_chunk + i_t
        _store_state(h, b_h1, i_state, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            _store_state(h, b_h2, i_state, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            _store_state(h, b_h3, i_state, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            _store_state(h, b_h4, i_state, i_h, 3, cols_v, H, K, V, BK)
        rows = bos + i_t * BT + tl.arange(0, BT)
        valid = rows < eos
        last = tl.minimum(bos + (i_t + 1) * BT, eos) - 1
        # V_new = U - W S
        b_vn = _load_block(u, rows, valid, cols_v, H, V, i_h)
        b_vn -= _dot(_key_block(w, rows, valid, 0, H, K, i_h, BK), b_h1, DT, DOT_PRECISION)
        if K > BK:
            b_vn -= _dot(_key_block(w, rows, valid, 1, H, K, i_h, BK), b_h2, DT, DOT_PRECISION)
        if K > 2 * BK:
            b_vn -= _dot(_key_block(w, rows, valid, 2, H, K, i_h, BK), b_h3, DT, DOT_PRECISION)
        if K > 3 * BK:
            b_vn -= _dot(_key_block(w, rows, valid, 3, H, K, i_h, BK), b_h4, DT, DOT_PRECISION)
        _store_block(v_new, b_vn, rows, valid, cols_v, H, V, i_h)
        # S <- exp(gamma_C) S + (exp(gamma_C - gamma) K)^T V_new
        b_gamma, b_gamma_last = _load_gamma(gamma, rows, valid, last, H, i_h)
        b_to_end = tl.exp(b_gamma_last - b_gamma)[:, None]
        b_decay = tl.exp(b_gamma_last)
        b_h1 = b_h1 * b_decay + _dot(tl.trans(_key_block(k, rows, valid, 0, H, K, i_h, BK) * b_to_end), b_vn, DT,
                                     DOT_PRECISION)
        if K > BK:
            b_h2 = b_h2 * b_decay + _dot(tl.trans(_key_block(k, rows, valid, 1, H, K, i_h, BK) * b_to_end), b_vn,
                                         DT, DOT_PRECISION)
        if K > 2 * BK:
            b_h3 = b_h3 * b_decay + _dot(tl.trans(_key_block(k, rows, valid, 2, H, K, i_h, BK) * b_to_end), b_vn,
                                         DT, DOT_PRECISION)
        if K > 3 * BK:
            b_h4 = b_h4 * b_decay + _dot(tl.trans(_key_block(k, rows, valid, 3, H, K, i_h, BK) * b_to_end), b_vn,
                                         DT, DOT_PRECISION)
    if STORE_FINAL_STATE:
        _store_state(final_state, b_h1, i_n, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            _store_state(final_state, b_h2, i_n, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            _store_state(final_state, b_h3, i_n, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            _store_state(final_state, b_h4, i_n, i_h, 3, cols_v, H, K, V, BK)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _output_kernel(
    q, k, gamma, h, v_new, o, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    DT = q.dtype.element_ty
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, last = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = _load_block(q, rows, valid, cols_k, H, K, i_h)
        p, m = _state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
        b_qk += _dot(b_q, tl.trans(_load_block(k, rows, valid, cols_k, H, K, i_h)), DT, DOT_PRECISION)
        b_o += _dot(b_q, tl.load(p, mask=m, other=0.0), DT, DOT_PRECISION)
    b_gamma, _ = _load_gamma(gamma, rows, valid, last, H, i_h)
    b_qk = b_qk * _decay(b_gamma, o_i[:, None] >= o_i[None, :])
    b_o = b_o * tl.exp(b_gamma)[:, None] + _dot(b_qk, _load_block(v_new, rows, valid, cols_v, H, V, i_h), DT,
                                                 DOT_PRECISION)
    _store_block(o, b_o * scale, rows, valid, cols_v, H, V, i_h)


@autotune(CONFIGS, key=["H", "K", "V", "USE_FINAL_STATE_GRAD", "USE_INITIAL_STATE"])
@triton.jit
def _state_bwd_kernel(
    q, k, w, gamma, do, dh, dv_new, d_final_state, d_initial_state, scale, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DT = q.dtype.element_ty
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n)
    o_i = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)

    b_dh1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh1 += _load_state(d_final_state, i_n, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            b_dh2 += _load_state(d_final_state, i_n, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            b_dh3 += _load_state(d_final_state, i_n, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            b_dh4 += _load_state(d_final_state, i_n, i_h, 3, cols_v, H, K, V, BK)
    num_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, num_chunks):
        i_t = num_chunks - 1 - i
        i_state = first_chunk + i_t
        _store_state(dh, b_dh1, i_state, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            _store_state(dh, b_dh2, i_state, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            _store_state(dh, b_dh3, i_state, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            _store_state(dh, b_dh4, i_state, i_h, 3, cols_v, H, K, V, BK)
        rows = bos + i_t * BT + o_i
        valid = rows < eos
        last = tl.minimum(bos + (i_t + 1) * BT, eos) - 1
        b_do = _load_block(do, rows, valid, cols_v, H, V, i_h)
        b_gamma, b_gamma_last = _load_gamma(gamma, rows, valid, last, H, i_h)
        # dV_new = scale (Q K^T * decay)^T dO + exp(gamma_C - gamma) K dS; (Q K^T * decay)^T is indexed [j, i]:
        # exp(gamma_i - gamma_j) for i >= j.
        b_kq = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            b_kq += _dot(_key_block(k, rows, valid, i_k, H, K, i_h, BK),
                         tl.trans(_key_block(q, rows, valid, i_k, H, K, i_h, BK)), DT, DOT_PRECISION)
        b_kq = b_kq * tl.trans(_decay(b_gamma, o_i[:, None] >= o_i[None, :]))
        b_dvn = _dot(b_kq * scale, b_do, DT, DOT_PRECISION)
        b_to_end = tl.exp(b_gamma_last - b_gamma)[:, None]
        b_dvn += _dot(_key_block(k, rows, valid, 0, H, K, i_h, BK) * b_to_end, b_dh1, DT, DOT_PRECISION)
        if K > BK:
            b_dvn += _dot(_key_block(k, rows, valid, 1, H, K, i_h, BK) * b_to_end, b_dh2, DT, DOT_PRECISION)
        if K > 2 * BK:
            b_dvn += _dot(_key_block(k, rows, valid, 2, H, K, i_h, BK) * b_to_end, b_dh3, DT, DOT_PRECISION)
        if K > 3 * BK:
            b_dvn += _dot(_key_block(k, rows, valid, 3, H, K, i_h, BK) * b_to_end, b_dh4, DT, DOT_PRECISION)
        _store_block(dv_new, b_dvn, rows, valid, cols_v, H, V, i_h)
        # dS <- exp(gamma_C) dS + scale (exp(gamma) Q)^T dO - W^T dV_new
        b_decay = tl.exp(b_gamma_last)
        b_q_scale = (scale * tl.exp(b_gamma))[:, None]
        b_dh1 = (b_dh1 * b_decay
                 + _dot(tl.trans(_key_block(q, rows, valid, 0, H, K, i_h, BK) * b_q_scale), b_do, DT, DOT_PRECISION)
                 - _dot(tl.trans(_key_block(w, rows, valid, 0, H, K, i_h, BK)), b_dvn, DT, DOT_PRECISION))
        if K > BK:
            b_dh2 = (b_dh2 * b_decay
                     + _dot(tl.trans(_key_block(q, rows, valid, 1, H, K, i_h, BK) * b_q_scale), b_do, DT,
                            DOT_PRECISION)
                     - _dot(tl.trans(_key_block(w, rows, valid, 1, H, K, i_h, BK)), b_dvn, DT, DOT_PRECISION))
        if K > 2 * BK:
            b_dh3 = (b_dh3 * b_decay
                     + _dot(tl.trans(_key_block(q, rows, valid, 2, H, K, i_h, BK) * b_q_scale), b_do, DT,
                            DOT_PRECISION)
                     - _dot(tl.trans(_key_block(w, rows, valid, 2, H, K, i_h, BK)), b_dvn, DT, DOT_PRECISION))
        if K > 3 * BK:
            b_dh4 = (b_dh4 * b_decay
                     + _dot(tl.trans(_key_block(q, rows, valid, 3, H, K, i_h, BK) * b_q_scale), b_do, DT,
                            DOT_PRECISION)
                     - _dot(tl.trans(_key_block(w, rows, valid, 3, H, K, i_h, BK)), b_dvn, DT, DOT_PRECISION))
    if USE_INITIAL_STATE:
        _store_state(d_initial_state, b_dh1, i_n, i_h, 0, cols_v, H, K, V, BK)
        if K > BK:
            _store_state(d_initial_state, b_dh2, i_n, i_h, 1, cols_v, H, K, V, BK)
        if K > 2 * BK:
            _store_state(d_initial_state, b_dh3, i_n, i_h, 2, cols_v, H, K, V, BK)
        if K > 3 * BK:
            _store_state(d_initial_state, b_dh4, i_n, i_h, 3, cols_v, H, K, V, BK)


# The intra-chunk backward is four kernels, each holding few of the chunk's [BT, BT] factors in registers at
# once (one kernel holding them all spilled hundreds of bytes of registers on sm_80): the sums over V, the sums
# over keys, the WY factors' dA, then dk. The factors pass between them in fp32 scratch ([tokens, H, BT]), as
# do the partial sums of dbeta and dgamma ([tokens, H]).
@autotune(CONFIGS, key=["H", "V"])
@triton.jit
def _intra_bwd_v_kernel(
    v, beta, gamma, t_inv, v_new, dv_new, do, dv, dqk, dt, dbeta_part, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The sums over V, one block of V at a time: dv; dQK = scale (dO V_new^T * decay); dT's U term,
    dU (beta V)^T with dU = dV_new; dbeta's V term."""
    DT = v.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = _load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)  # T enters dots only: in their operand dtype
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_dqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        b_v = _load_block(v, rows, valid, cols_v, H, V, i_h)
        b_dvn = _load_block(dv_new, rows, valid, cols_v, H, V, i_h)
        b_dqk += _dot(_load_block(do, rows, valid, cols_v, H, V, i_h),
                      tl.trans(_load_block(v_new, rows, valid, cols_v, H, V, i_h)), DT, DOT_PRECISION)
        b_dt += _dot(b_dvn, tl.trans(b_v * b_beta[:, None]), DT, DOT_PRECISION)
        b_dvb = _dot(tl.trans(b_t), b_dvn, DT, DOT_PRECISION)  # d(beta V) = T^T dU
        _store_block(dv, b_dvb * b_beta[:, None], rows, valid, cols_v, H, V, i_h)
        b_dbeta += tl.sum(b_dvb * b_v, axis=1)
    b_gamma, _ = _load_gamma(gamma, rows, valid, last, H, i_h)
    _store_block(dqk, b_dqk * _decay(b_gamma, o_i[:, None] >= o_i[None, :]) * scale, rows, valid, o_i, H, BT, i_h)
    _store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)
    tl.store(dbeta_part + rows * H + i_h, b_dbeta, mask=valid)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _intra_bwd_k_kernel(
    q, k, beta, gamma, h, dv_new, do, dq, dqk, dt, dgamma_part, scale, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The sums over keys, one block of keys at a time: dq of the output O = scale (exp(gamma) Q S + (Q K^T *
    decay) V_new), dT's W term dW (beta exp(gamma) K)^T with dW = -dV_new S^T (added to dt), and dgamma's
    output terms. Gate gradients take only the pairs i > j, each +m_ij to gamma_i and -m_ij to gamma_j: the
    diagonal (exp(0)) and the last token's decay to the chunk end are constants, and summing their O(1) terms
    with opposite signs would swamp dg when the gates are tiny."""
    DT = q.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    strictly_lower = o_i[:, None] > o_i[None, :]
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_gamma, _ = _load_gamma(gamma, rows, valid, last, H, i_h)
    b_exp = tl.exp(b_gamma)
    b_dqk = _load_block(dqk, rows, valid, o_i, H, BT, i_h)
    b_dt = _load_block(dt, rows, valid, o_i, H, BT, i_h)
    b_dgamma = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = _load_block(q, rows, valid, cols_k, H, K, i_h)
        b_k = _load_block(k, rows, valid, cols_k, H, K, i_h)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = _state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            b_dq += _dot(_load_block(do, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_dw -= _dot(_load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
        b_dq = b_dq * (scale * b_exp)[:, None]
        b_dgamma += tl.sum(b_q * b_dq, axis=1)
        b_dq += _dot(b_dqk, b_k, DT, DOT_PRECISION)
        _store_block(dq, b_dq, rows, valid, cols_k, H, K, i_h)
        b_m = tl.where(strictly_lower, b_dqk * _dot(b_q, tl.trans(b_k), DT, DOT_PRECISION), 0.0)
        b_dgamma += tl.sum(b_m, axis=1) - tl.sum(b_m, axis=0)
        b_dt += _dot(b_dw, tl.trans(b_k * (b_beta * b_exp)[:, None]), DT, DOT_PRECISION)
    _store_block(dt, b_dt, rows, valid, o_i, H, BT, i_h)
    tl.store(dgamma_part + rows * H + i_h, b_dgamma, mask=valid)


@autotune(WARPS_STAGES, key=["H", "K"])
@triton.jit
def _intra_bwd_wy_kernel(
    k, beta, gamma, t_inv, dt, da, dbeta_part, dgamma_part, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The WY factors' gradient: V_new = U - W S, W = T diag(beta exp(gamma)) K, U = T diag(beta) V and
    T = (I + A)^{-1} give dA = -T^T dT T^T; then dA's terms of dbeta and dgamma, with K K^T summed over the
    key blocks."""
    DT = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = _load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)
    b_dt = _load_block(dt, rows, valid, o_i, H, BT, i_h)
    b_gamma, _ = _load_gamma(gamma, rows, valid, last, H, i_h)
    b_da = -_dot(_dot(tl.trans(b_t), b_dt, DT, DOT_PRECISION), tl.trans(b_t), DT, DOT_PRECISION)
    b_da = b_da * _decay(b_gamma, o_i[:, None] > o_i[None, :])  # dA * exp(gamma_i - gamma_j): d(beta_i k_i . k_j)
    _store_block(da, b_da, rows, valid, o_i, H, BT, i_h)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = _load_block(k, rows, valid, i_k * BK + tl.arange(0, BK), H, K, i_h)
        b_kk += _dot(b_k, tl.trans(b_k), DT, DOT_PRECISION)
    b_da_kk = b_da * b_kk
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_da_a = b_da_kk * b_beta[:, None]  # dA * A
    p_dbeta, p_dgamma = dbeta_part + rows * H + i_h, dgamma_part + rows * H + i_h
    tl.store(p_dbeta, tl.load(p_dbeta, mask=valid, other=0.0) + tl.sum(b_da_kk, axis=1), mask=valid)
    tl.store(p_dgamma, tl.load(p_dgamma, mask=valid, other=0.0) + tl.sum(b_da_a, axis=1) - tl.sum(b_da_a, axis=0),
             mask=valid)


@autotune(CONFIGS, key=["H", "K", "V"])
@triton.jit
def _intra_bwd_dk_kernel(
    q, k, beta, gamma, t_inv, h, dh, v_new, dv_new, dqk, da, dbeta_part, dgamma_part, dk, dbeta, dg,
    cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk, key block by key block, from the output's and the state hand-off's terms (dS from the chunk's end)
    and the WY factors'; then dbeta and dg whole."""
    DT = q.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, valid, last = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    b_t = _load_block(t_inv, rows, valid, o_i, H, BT, i_h).to(DT)
    b_dqk = _load_block(dqk, rows, valid, o_i, H, BT, i_h).to(DT)  # from here on only dot operands
    b_da = _load_block(da, rows, valid, o_i, H, BT, i_h).to(DT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_gamma, b_gamma_last = _load_gamma(gamma, rows, valid, last, H, i_h)
    b_exp = tl.exp(b_gamma)
    b_dbeta = tl.load(dbeta_part + rows * H + i_h, mask=valid, other=0.0)
    b_dgamma = tl.load(dgamma_part + rows * H + i_h, mask=valid, other=0.0)
    # dW = -dV_new S^T is recomputed: a [tokens, H, K] scratch buffer would cost more memory traffic.
    b_h_dh = tl.zeros([BK], dtype=tl.float32)  # rows of S * dS, summed over V
    b_k_dk_state = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        b_q = _load_block(q, rows, valid, cols_k, H, K, i_h)
        b_k = _load_block(k, rows, valid, cols_k, H, K, i_h)
        b_dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # V_new dS^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            p, m = _state_block(h, i_c, i_h, cols_k, cols_v, H, K, V)
            b_h = tl.load(p, mask=m, other=0.0)
            p, m = _state_block(dh, i_c, i_h, cols_k, cols_v, H, K, V)
            b_dh = tl.load(p, mask=m, other=0.0)
            b_dk_state += _dot(_load_block(v_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_dh), DT,
                               DOT_PRECISION)
            b_dw -= _dot(_load_block(dv_new, rows, valid, cols_v, H, V, i_h), tl.trans(b_h), DT, DOT_PRECISION)
            b_h_dh += tl.sum(b_h * b_dh, axis=1)
        b_dk_state = b_dk_state * tl.exp(b_gamma_last - b_gamma)[:, None]
        b_k_dk_state += tl.sum(b_k * b_dk_state, axis=1)
        b_dkb = _dot(tl.trans(b_t), b_dw, DT, DOT_PRECISION)  # d(beta exp(gamma) K) = T^T dW
        b_dk = _dot(tl.trans(b_dqk), b_q, DT, DOT_PRECISION) + b_dk_state + b_dkb * (b_beta * b_exp)[:, None]
        b_dk += _dot(b_da, b_k, DT, DOT_PRECISION) * b_beta[:, None]
        b_dk += _dot(tl.trans(b_da), b_k * b_beta[:, None], DT, DOT_PRECISION)
        _store_block(dk, b_dk, rows, valid, cols_k, H, K, i_h)
        b_dkb_k = tl.sum(b_dkb * b_k, axis=1)
        b_dbeta += b_dkb_k * b_exp
        b_dgamma += b_dkb_k * b_beta * b_exp
    # g_t enters gamma_s for every s >= t of the chunk, gamma_C (all t), and gamma_C - gamma_j for j < t.
    later = o_i[None, :] >= o_i[:, None]  # [t, s]: s >= t
    b_dg = tl.sum(tl.where(later, b_dgamma[None, :], 0.0), axis=1)
    b_dg += tl.exp(b_gamma_last) * tl.sum(b_h_dh)
    b_dg += tl.sum(tl.where(later, 0.0, b_k_dk_state[None, :]), axis=1)

    tl.store(dbeta + rows * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=valid)
    tl.store(dg + rows * H + i_h, b_dg.to(dg.dtype.element_ty), mask=valid)


class ChunkList:
    """The chunks of the flattened tokens: (sequence, chunk within it) per chunk, and each sequence's first
    chunk (where its states are stored). Built on the host from the sequence bounds (with cu_seqlens that is
    one device sync), then copied over; the forward builds it once and the backward reuses it. The chunk
    tables are made on first use (a decode step with the fused kernel needs only the bounds)."""

    def __init__(self, cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device):
        self._bounds = torch.tensor(sequence_bounds(cu_seqlens, B, T), dtype=torch.int32)
        self.cu_seqlens = self._bounds.to(device)
        self.num_sequences = len(self._bounds) - 1

    @functools.cached_property
    def chunk_indices(self) -> torch.Tensor:
        return prepare_chunk_indices(self._bounds, CHUNK_SIZE).to(self.cu_seqlens.device)

    @functools.cached_property
    def chunk_offsets(self) -> torch.Tensor:
        return prepare_chunk_offsets(self._bounds, CHUNK_SIZE).to(self.cu_seqlens.device)

    @property
    def num_chunks(self) -> int:
        return self.chunk_indices.shape[0]


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16


def check_key_dim(K: int) -> None:
    if K > 4 * 64:
        raise ValueError(f"the Triton gated delta rule takes head dims K <= 256 (four key blocks of 64), got K={K}")


def _keys_per_block(K: int, most: int = 64) -> int:
    """Keys per block: 64 (as flash-linear-attention's kernels; the state kernels hold up to four blocks), 32 in
    the intra-chunk backward, whose [BT, BT] factors leave too few registers for [BT, 64] blocks on sm_80."""
    return min(most, _block(K))


def _wy(k, v, g, beta, chunks: ChunkList, store_t: bool, precision: str):
    TT, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    gamma = torch.empty(TT, H, **f32)
    w = torch.empty(TT, H, K, **f32)
    u = torch.empty(TT, H, V, **f32)
    t_inv = torch.empty(TT, H, CHUNK_SIZE, **f32) if store_t else None
    if chunks.num_chunks:
        _wy_kernel[(chunks.num_chunks, H)](
            k, v, g, beta, gamma, w, u, t_inv, chunks.cu_seqlens, chunks.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK_SIZE, BK=_keys_per_block(K), STORE_T=store_t, DOT_PRECISION=precision,
        )
    return gamma, w, u, t_inv


def _states(k, w, u, gamma, initial_state, chunks: ChunkList, output_final_state: bool, precision: str):
    TT, H, K = k.shape
    V = u.shape[-1]
    h = torch.empty(chunks.num_chunks, H, K, V, dtype=torch.float32, device=k.device)
    v_new = torch.empty(TT, H, V, dtype=torch.float32, device=k.device)
    final_state = torch.empty(chunks.num_sequences, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_sequences * H)  # noqa: E731
    _state_fwd_kernel[grid](
        k, w, u, gamma, h, v_new, initial_state, final_state, chunks.cu_seqlens, chunks.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=_keys_per_block(K), USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, DOT_PRECISION=precision,
    )
    return h, v_new, final_state


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot precision for inputs like x: fp32 inputs get exact fp32 dots (no tf32), so they match the
    reference to fp32 rounding; bf16/fp16 operands use the tensor cores either way."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks: ChunkList):
    """Forward kernels on [B, T, ...] inputs; returns (o, final_state or None)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    precision = dot_precision(q)
    q, k, v, g, beta = _flatten(q, k, v, g, beta)
    gamma, w, u, _ = _wy(k, v, g, beta, chunks, store_t=False, precision=precision)
    h, v_new, final_state = _states(k, w, u, gamma, initial_state, chunks, output_final_state, precision)
    o = torch.empty(B * T, H, V, dtype=v.dtype, device=v.device)
    if chunks.num_chunks:
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_chunks, H)  # noqa: E731
        _output_kernel[grid](
            q, k, gamma, h, v_new, o, scale, chunks.cu_seqlens, chunks.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK_SIZE, BK=_keys_per_block(K), DOT_PRECISION=precision,
        )
    return o.view(B, T, H, V), final_state


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, chunks: ChunkList, do, d_final_state):
    """Gradients (dq, dk, dv, dg, dbeta, d_initial_state or None) of the op at these inputs, recomputing the
    chunk states from the inputs. d_final_state may be None (no gradient flows into the final state)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    precision = dot_precision(q)
    q, k, v, g, beta, do = _flatten(q, k, v, g, beta, do)
    gamma, w, u, t_inv = _wy(k, v, g, beta, chunks, store_t=True, precision=precision)
    h, v_new, _ = _states(k, w, u, gamma, initial_state, chunks, False, precision)
    dh = torch.empty_like(h)
    dv_new = torch.empty_like(v_new)
    d_h0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_sequences * H)  # noqa: E731
    _state_bwd_kernel[grid](
        q, k, w, gamma, do, dh, dv_new, d_final_state, d_h0, scale, chunks.cu_seqlens, chunks.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=_keys_per_block(K), USE_FINAL_STATE_GRAD=d_final_state is not None,
        USE_INITIAL_STATE=initial_state is not None, DOT_PRECISION=precision,
    )
    dq, dk, dv, dbeta, dg = (torch.empty_like(x) for x in (q, k, v, beta, g))
    if chunks.num_chunks:
        f32 = dict(dtype=torch.float32, device=k.device)
        dqk, dt, da = (torch.empty(k.shape[0], H, CHUNK_SIZE, **f32) for _ in range(3))
        dbeta_part, dgamma_part = (torch.empty(k.shape[0], H, **f32) for _ in range(2))
        grid, index = (chunks.num_chunks, H), (chunks.cu_seqlens, chunks.chunk_indices)
        shapes = dict(H=H, BT=CHUNK_SIZE, DOT_PRECISION=precision)
        keys = dict(K=K, BK=_keys_per_block(K, most=32))
        _intra_bwd_v_kernel[grid](v, beta, gamma, t_inv, v_new, dv_new, do, dv, dqk, dt, dbeta_part, scale, *index,
                                  V=V, **shapes)
        _intra_bwd_k_kernel[grid](q, k, beta, gamma, h, dv_new, do, dq, dqk, dt, dgamma_part, scale, *index, V=V,
                                  **keys, **shapes)
        _intra_bwd_wy_kernel[grid](k, beta, gamma, t_inv, dt, da, dbeta_part, dgamma_part, *index, **keys, **shapes)
        _intra_bwd_dk_kernel[grid](q, k, beta, gamma, t_inv, h, dh, v_new, dv_new, dqk, da, dbeta_part, dgamma_part,
                                   dk, dbeta, dg, *index, V=V, **keys, **shapes)
    if d_h0 is not None:
        d_h0 = d_h0.to(initial_state.dtype)
    return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), dg.view(B, T, H),
            dbeta.view(B, T, H), d_h0)


def _flatten(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, H, ...] -> contiguous [B*T, H, ...]: the kernels index tokens of the flattened batch."""
    return [x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous() for x in xs]


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, output_final_state, cu_seqlens):
        initial_state = initial_state.contiguous() if initial_state is not None else None
        chunks = ChunkList(cu_seqlens, q.shape[0], q.shape[1], q.device)
        o, final_state = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                    chunks)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.chunks = scale, chunks
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        if d_final_state is not None:
            d_final_state = d_final_state.contiguous()
        grads = chunk_gated_delta_rule_bwd(q, k, v, g, beta, ctx.scale, initial_state, ctx.chunks, do,
                                           d_final_state)
        return *grads, None, None, None


def chunk_gated_delta_rule_triton(
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
    """Triton chunkwise gated delta rule; same contract as `kernels.chunk_gated_delta_rule`."""
    check_key_dim(k.shape[-1])
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, initial_state, scale, output_final_state, cu_seqlens)
