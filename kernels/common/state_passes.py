"""The chunk-state pass and its backward, shared by every chunkwise op (Triton).

Per chunk of BT tokens, with g_cumsum the gate's cumulative sum from the chunk's start (fp32; [tokens, H] for a
scalar gate, [tokens, H, K] for a vector gate) and S the state entering the chunk:
    forward   S <- exp(g_C) S + (k exp(g_C - g))^T v                          (v = V_new = U - W S: delta rule)
    backward  dS <- exp(g_C) dS + scale (q exp(g))^T do  [- W^T dV_new]
              dV_new = A^T do + (k exp(g_C - g)) dS, A = scale (q k^T * decay)  (delta rule only; a vector
              gate's A, a decay per key channel, comes precomputed, as for the output pass)
The forward stores the state entering every chunk (h, fp32) and optionally the final one; the backward stores
the gradient of the state leaving every chunk (dh) and optionally d initial_state. Both run sequentially over
a sequence's chunks, in parallel over sequences, heads and blocks of V. A diagonal gate leaves the keys
independent, so its programs also split K (one [BK, BV] block each); the delta rule's W S couples all keys,
so one program holds the whole state as up to four [BK = 64, BV] key blocks (K <= 256), as
flash-linear-attention's kernels do. Blocks past K are never touched (their count is a constexpr).
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.tiles import dot, load_block, load_scalar_cumsum, load_state, masked_exp, store_block, store_state
from kernels.tuning import autotune

KEY_BLOCK = 64
MAX_KEY_BLOCKS = 4

# Three candidates per kernel (kernels/tuning.py), the heuristic config first: V blocks of 32, 8 warps, no
# pipelining (what trained on an H200, and the first config that fits unspilled on sm_80/90/100 at K = 256,
# V = 512); 64-wide V blocks with a two-stage pipeline; 16-wide ones (on sm_80 at K = 256 the delta rule's
# state backward keeps its four [64, BV] key blocks in registers only with BV = 16).
CONFIGS = [triton.Config({"BV": 32}, num_warps=8, num_stages=1), triton.Config({"BV": 64}, num_warps=4, num_stages=2),
           triton.Config({"BV": 16}, num_warps=4, num_stages=1)]


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot precision for inputs like x: fp32 inputs get exact fp32 dots (no tf32), so they match the
    reference to fp32 rounding; bf16/fp16 operands use the tensor cores either way."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def block_size(d: int, most: int = 64) -> int:
    """A tile of at most `most` covering d, at least 16 (tl.dot's minimum)."""
    return min(most, max(16, triton.next_power_of_2(d)))


def check_key_dim(K: int) -> None:
    if K > MAX_KEY_BLOCKS * KEY_BLOCK:
        raise ValueError(f"the Triton delta-rule kernels take head dims K <= {MAX_KEY_BLOCKS * KEY_BLOCK} "
                         f"({MAX_KEY_BLOCKS} key blocks of {KEY_BLOCK}), got K={K}")


@triton.jit
def _keys_to_end(k, g_cumsum, rows, valid, last, cols_k, H: tl.constexpr, K: tl.constexpr, i_h,
                 VECTOR_GATE: tl.constexpr):
    """k exp(g_C - g) for one key block (each key's decay to the chunk's end), and the chunk's total decay
    exp(g_C): [BK, 1] with a vector gate, a scalar otherwise."""
    b_k = load_block(k, rows, valid, cols_k, H, K, i_h)
    if VECTOR_GATE:
        b_last = tl.load(g_cumsum + (last * H + i_h) * K + cols_k, mask=cols_k < K, other=0.0)
        b_g = load_block(g_cumsum, rows, valid, cols_k, H, K, i_h)
        b_k = b_k * masked_exp(b_last[None, :] - b_g, valid[:, None] & (cols_k < K)[None, :])
        b_decay = tl.exp(b_last)[:, None]
    else:
        b_g, b_last = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
        b_k = b_k * tl.exp(b_last - b_g)[:, None]
        b_decay = tl.exp(b_last)
    return b_k, b_decay


@triton.jit
def _queries_decayed(q, g_cumsum, rows, valid, last, cols_k, H: tl.constexpr, K: tl.constexpr, i_h,
                     VECTOR_GATE: tl.constexpr):
    """q exp(g) for one key block: each query's decay from the chunk's start."""
    b_q = load_block(q, rows, valid, cols_k, H, K, i_h)
    if VECTOR_GATE:
        b_q = b_q * tl.exp(load_block(g_cumsum, rows, valid, cols_k, H, K, i_h))
    else:
        b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
        b_q = b_q * tl.exp(b_g)[:, None]
    return b_q


@triton.jit
def _advance(b_h, k, g_cumsum, b_v, rows, valid, last, cols_k, H: tl.constexpr, K: tl.constexpr, i_h,
             VECTOR_GATE: tl.constexpr, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of S <- exp(g_C) S + (k exp(g_C - g))^T v."""
    b_k, b_decay = _keys_to_end(k, g_cumsum, rows, valid, last, cols_k, H, K, i_h, VECTOR_GATE)
    return b_h * b_decay + dot(tl.trans(b_k), b_v, DT, DOT_PRECISION)


@triton.jit
def _load_key_blocks(ptr, i_state, i_h, cols_1, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, KEY_BLOCKS: tl.constexpr, LOAD: tl.constexpr):
    """The up to four [BK, BV] key blocks of state i_state from cols_1 on (fp32), zeros unless LOAD."""
    b_1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_4 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        b_1 += load_state(ptr, i_state, i_h, cols_1, cols_v, H, K, V)
        if KEY_BLOCKS > 1:
            b_2 += load_state(ptr, i_state, i_h, cols_1 + BK, cols_v, H, K, V)
        if KEY_BLOCKS > 2:
            b_3 += load_state(ptr, i_state, i_h, cols_1 + 2 * BK, cols_v, H, K, V)
        if KEY_BLOCKS > 3:
            b_4 += load_state(ptr, i_state, i_h, cols_1 + 3 * BK, cols_v, H, K, V)
    return b_1, b_2, b_3, b_4


@triton.jit
def _store_key_blocks(ptr, b_1, b_2, b_3, b_4, i_state, i_h, cols_1, cols_v, H: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, BK: tl.constexpr, KEY_BLOCKS: tl.constexpr):
    store_state(ptr, b_1, i_state, i_h, cols_1, cols_v, H, K, V)
    if KEY_BLOCKS > 1:
        store_state(ptr, b_2, i_state, i_h, cols_1 + BK, cols_v, H, K, V)
    if KEY_BLOCKS > 2:
        store_state(ptr, b_3, i_state, i_h, cols_1 + 2 * BK, cols_v, H, K, V)
    if KEY_BLOCKS > 3:
        store_state(ptr, b_4, i_state, i_h, cols_1 + 3 * BK, cols_v, H, K, V)


@autotune(CONFIGS, key=["H", "K", "V", "VECTOR_GATE", "DELTA", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def state_fwd_kernel(
    k, v, w, g_cumsum, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KEY_BLOCKS: tl.constexpr, VECTOR_GATE: tl.constexpr, DELTA: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[chunk] = the state entering each chunk. With DELTA, v holds U and V_new = U - W S is stored."""
    DT = k.dtype.element_ty
    i_v, i_nh, i_kp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    cols_v = i_v * BV + tl.arange(0, BV)
    cols_1 = i_kp * KEY_BLOCKS * BK + tl.arange(0, BK)
    cols_2, cols_3, cols_4 = cols_1 + BK, cols_1 + 2 * BK, cols_1 + 3 * BK
    b_h1, b_h2, b_h3, b_h4 = _load_key_blocks(initial_state, i_n, i_h, cols_1, cols_v, H, K, V, BK, BV, KEY_BLOCKS,
                                              USE_INITIAL_STATE)
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        _store_key_blocks(h, b_h1, b_h2, b_h3, b_h4, first_chunk + i_t, i_h, cols_1, cols_v, H, K, V, BK, KEY_BLOCKS)
        rows = bos + i_t * BT + tl.arange(0, BT)
        valid = rows < eos
        last = tl.minimum(bos + (i_t + 1) * BT, eos) - 1
        b_v = load_block(v, rows, valid, cols_v, H, V, i_h)
        if DELTA:  # V_new = U - W S
            b_v -= dot(load_block(w, rows, valid, cols_1, H, K, i_h), b_h1, DT, DOT_PRECISION)
            if KEY_BLOCKS > 1:
                b_v -= dot(load_block(w, rows, valid, cols_2, H, K, i_h), b_h2, DT, DOT_PRECISION)
            if KEY_BLOCKS > 2:
                b_v -= dot(load_block(w, rows, valid, cols_3, H, K, i_h), b_h3, DT, DOT_PRECISION)
            if KEY_BLOCKS > 3:
                b_v -= dot(load_block(w, rows, valid, cols_4, H, K, i_h), b_h4, DT, DOT_PRECISION)
            store_block(v_new, b_v, rows, valid, cols_v, H, V, i_h)
        b_h1 = _advance(b_h1, k, g_cumsum, b_v, rows, valid, last, cols_1, H, K, i_h, VECTOR_GATE, DT, DOT_PRECISION)
        if KEY_BLOCKS > 1:
            b_h2 = _advance(b_h2, k, g_cumsum, b_v, rows, valid, last, cols_2, H, K, i_h, VECTOR_GATE, DT,
                            DOT_PRECISION)
        if KEY_BLOCKS > 2:
            b_h3 = _advance(b_h3, k, g_cumsum, b_v, rows, valid, last, cols_3, H, K, i_h, VECTOR_GATE, DT,
                            DOT_PRECISION)
        if KEY_BLOCKS > 3:
            b_h4 = _advance(b_h4, k, g_cumsum, b_v, rows, valid, last, cols_4, H, K, i_h, VECTOR_GATE, DT,
                            DOT_PRECISION)
    if STORE_FINAL_STATE:
        _store_key_blocks(final_state, b_h1, b_h2, b_h3, b_h4, i_n, i_h, cols_1, cols_v, H, K, V, BK, KEY_BLOCKS)


@triton.jit
def _retreat(b_dh, q, w, g_cumsum, b_do, b_dvn, scale, rows, valid, last, cols_k, H: tl.constexpr, K: tl.constexpr,
             i_h, VECTOR_GATE: tl.constexpr, DELTA: tl.constexpr, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of dS <- exp(g_C) dS + scale (q exp(g))^T do [- W^T dV_new]."""
    if VECTOR_GATE:
        b_last = tl.load(g_cumsum + (last * H + i_h) * K + cols_k, mask=cols_k < K, other=0.0)
        b_decay = tl.exp(b_last)[:, None]
    else:
        b_decay = tl.exp(tl.load(g_cumsum + last * H + i_h))
    b_q = _queries_decayed(q, g_cumsum, rows, valid, last, cols_k, H, K, i_h, VECTOR_GATE) * scale
    b_dh = b_dh * b_decay + dot(tl.trans(b_q), b_do, DT, DOT_PRECISION)
    if DELTA:
        b_dh -= dot(tl.trans(load_block(w, rows, valid, cols_k, H, K, i_h)), b_dvn, DT, DOT_PRECISION)
    return b_dh


@autotune(CONFIGS, key=["H", "K", "V", "VECTOR_GATE", "DELTA", "USE_FINAL_STATE_GRAD", "USE_INITIAL_STATE"])
@triton.jit
def state_bwd_kernel(
    q, k, w, A, g_cumsum, do, dh, dv_new, d_final_state, d_initial_state, scale, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KEY_BLOCKS: tl.constexpr, VECTOR_GATE: tl.constexpr, DELTA: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dh[chunk] = the gradient of the state leaving each chunk, scanned backwards; with DELTA also dV_new."""
    DT = q.dtype.element_ty
    i_v, i_nh, i_kp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    o_i = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)
    cols_1 = i_kp * KEY_BLOCKS * BK + tl.arange(0, BK)
    cols_2, cols_3, cols_4 = cols_1 + BK, cols_1 + 2 * BK, cols_1 + 3 * BK
    b_dh1, b_dh2, b_dh3, b_dh4 = _load_key_blocks(d_final_state, i_n, i_h, cols_1, cols_v, H, K, V, BK, BV,
                                                  KEY_BLOCKS, USE_FINAL_STATE_GRAD)
    num_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, num_chunks):
        i_t = num_chunks - 1 - i
        _store_key_blocks(dh, b_dh1, b_dh2, b_dh3, b_dh4, first_chunk + i_t, i_h, cols_1, cols_v, H, K, V, BK,
                          KEY_BLOCKS)
        rows = bos + i_t * BT + o_i
        valid = rows < eos
        last = tl.minimum(bos + (i_t + 1) * BT, eos) - 1
        b_do = load_block(do, rows, valid, cols_v, H, V, i_h)
        b_dvn = tl.zeros([BT, BV], dtype=tl.float32)
        if DELTA:  # dV_new = A^T dO + (K exp(g_C - g)) dS, A = scale (Q K^T * decay) the output pass's
            if VECTOR_GATE:  # a decay per key channel: A comes precomputed (KDA's intra-chunk kernel)
                # in the dots' dtype from the load on: a [BT, BT] fp32 tile spilled registers on sm_80/100
                b_dvn = dot(tl.trans(load_block(A, rows, valid, o_i, H, BT, i_h).to(DT)), b_do, DT, DOT_PRECISION)
            else:  # the decay [j, i] = exp(g_i - g_j)
                b_g, _ = load_scalar_cumsum(g_cumsum, rows, valid, last, H, i_h)
                b_kq = tl.zeros([BT, BT], dtype=tl.float32)
                for i_k in range(0, KEY_BLOCKS):
                    cols_k = cols_1 + i_k * BK
                    b_kq += dot(load_block(k, rows, valid, cols_k, H, K, i_h),
                                tl.trans(load_block(q, rows, valid, cols_k, H, K, i_h)), DT, DOT_PRECISION)
                b_kq = b_kq * tl.exp(tl.where(o_i[:, None] <= o_i[None, :], b_g[None, :] - b_g[:, None],
                                              float("-inf")))
                b_dvn = dot(b_kq * scale, b_do, DT, DOT_PRECISION)
            b_k, _ = _keys_to_end(k, g_cumsum, rows, valid, last, cols_1, H, K, i_h, VECTOR_GATE)
            b_dvn += dot(b_k, b_dh1, DT, DOT_PRECISION)
            if KEY_BLOCKS > 1:
                b_k, _ = _keys_to_end(k, g_cumsum, rows, valid, last, cols_2, H, K, i_h, VECTOR_GATE)
                b_dvn += dot(b_k, b_dh2, DT, DOT_PRECISION)
            if KEY_BLOCKS > 2:
                b_k, _ = _keys_to_end(k, g_cumsum, rows, valid, last, cols_3, H, K, i_h, VECTOR_GATE)
                b_dvn += dot(b_k, b_dh3, DT, DOT_PRECISION)
            if KEY_BLOCKS > 3:
                b_k, _ = _keys_to_end(k, g_cumsum, rows, valid, last, cols_4, H, K, i_h, VECTOR_GATE)
                b_dvn += dot(b_k, b_dh4, DT, DOT_PRECISION)
            store_block(dv_new, b_dvn, rows, valid, cols_v, H, V, i_h)
        b_dh1 = _retreat(b_dh1, q, w, g_cumsum, b_do, b_dvn, scale, rows, valid, last, cols_1, H, K, i_h, VECTOR_GATE,
                         DELTA, DT, DOT_PRECISION)
        if KEY_BLOCKS > 1:
            b_dh2 = _retreat(b_dh2, q, w, g_cumsum, b_do, b_dvn, scale, rows, valid, last, cols_2, H, K, i_h,
                             VECTOR_GATE, DELTA, DT, DOT_PRECISION)
        if KEY_BLOCKS > 2:
            b_dh3 = _retreat(b_dh3, q, w, g_cumsum, b_do, b_dvn, scale, rows, valid, last, cols_3, H, K, i_h,
                             VECTOR_GATE, DELTA, DT, DOT_PRECISION)
        if KEY_BLOCKS > 3:
            b_dh4 = _retreat(b_dh4, q, w, g_cumsum, b_do, b_dvn, scale, rows, valid, last, cols_4, H, K, i_h,
                             VECTOR_GATE, DELTA, DT, DOT_PRECISION)
    if USE_INITIAL_STATE:
        _store_key_blocks(d_initial_state, b_dh1, b_dh2, b_dh3, b_dh4, i_n, i_h, cols_1, cols_v, H, K, V, BK,
                          KEY_BLOCKS)


def _key_layout(K: int, delta: bool) -> tuple[int, int, int]:
    """(BK, key blocks per program, programs along K): the delta rule holds every key in one program."""
    BK = block_size(K, KEY_BLOCK)
    if delta:
        check_key_dim(K)
        return BK, triton.cdiv(K, BK), 1
    return BK, 1, triton.cdiv(K, BK)


def chunk_states(k, v, g_cumsum, chunks: ChunkIndex, initial_state, output_final_state: bool, w=None):
    """The forward pass over [tokens, H, ...] inputs: (h [num_chunks, H, K, V] fp32, V_new (delta rule, given
    W and v = U) or None, final state or None)."""
    H, K, V = k.shape[-2], k.shape[-1], v.shape[-1]
    delta, vector_gate = w is not None, g_cumsum.dim() == k.dim()
    f32 = dict(dtype=torch.float32, device=k.device)
    h = torch.empty(chunks.num_chunks, H, K, V, **f32)
    v_new = torch.empty(v.shape, **f32) if delta else None
    final_state = torch.empty(chunks.num_sequences, H, K, V, **f32) if output_final_state else None
    BK, key_blocks, key_programs = _key_layout(K, delta)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_sequences * H, key_programs)  # noqa: E731
    state_fwd_kernel[grid](
        k, v, w, g_cumsum, h, v_new, initial_state, final_state, chunks.cu_seqlens, chunks.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, KEY_BLOCKS=key_blocks, VECTOR_GATE=vector_gate, DELTA=delta,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=dot_precision(k),
    )
    return h, v_new, final_state


def chunk_state_grads(q, k, g_cumsum, do, scale, chunks: ChunkIndex, d_final_state, initial_state, w=None, A=None):
    """The backward pass: (dh [num_chunks, H, K, V] fp32, dV_new (delta rule) or None, d initial_state (fp32,
    when there is an initial state) or None). d_final_state may be None (no gradient flows into it). A delta
    rule with a vector gate (KDA) gives the output pass's A [tokens, H, BT] (scale included)."""
    H, K, V = q.shape[-2], q.shape[-1], do.shape[-1]
    delta, vector_gate = w is not None, g_cumsum.dim() == q.dim()
    f32 = dict(dtype=torch.float32, device=q.device)
    dh = torch.empty(chunks.num_chunks, H, K, V, **f32)
    dv_new = torch.empty(do.shape, **f32) if delta else None
    d_initial = torch.empty(initial_state.shape, **f32) if initial_state is not None else None
    BK, key_blocks, key_programs = _key_layout(K, delta)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), chunks.num_sequences * H, key_programs)  # noqa: E731
    state_bwd_kernel[grid](
        q, k, w, A, g_cumsum, do, dh, dv_new, d_final_state, d_initial, scale, chunks.cu_seqlens, chunks.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, KEY_BLOCKS=key_blocks, VECTOR_GATE=vector_gate, DELTA=delta,
        USE_FINAL_STATE_GRAD=d_final_state is not None, USE_INITIAL_STATE=initial_state is not None,
        DOT_PRECISION=dot_precision(q),
    )
    return dh, dv_new, d_initial
