"""Triton jit helpers of every chunkwise kernel: where a chunk's tokens are, tile loads and stores, decays and
dots. Tensors are token-major, [tokens, H, D] over the flattened token axis (a [B, T] batch is B sequences);
states are [*, H, K, V]. Offsets are int64 (ChunkIndex), so no product of tokens, heads and dims overflows.
Plain pointers, no block pointers (gone in triton 3.9), so the kernels also run in the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def chunk_span(cu_seqlens, chunk_indices, i_c):
    """(chunk within its sequence, the sequence's first token, its end) of global chunk i_c."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    return i_t, tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)


@triton.jit
def chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """Token rows of global chunk i_c, their validity mask, and the row of the chunk's last valid token."""
    i_t, bos, eos = chunk_span(cu_seqlens, chunk_indices, i_c)
    start = bos + i_t * BT
    rows = start + tl.arange(0, BT)
    return rows, rows < eos, tl.minimum(start + BT, eos) - 1


@triton.jit
def load_block(ptr, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h):
    """[len(rows), len(cols)] block of a [tokens, H, D] tensor for head i_h, zeros outside. In the tensor's
    dtype: bf16 blocks take half the registers, and every use is a dot operand (in that dtype) or a product
    with an fp32 value (promoted, exactly, to fp32)."""
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + (rows[:, None] * H + i_h) * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_block(ptr, value, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h):
    mask = row_mask[:, None] & (cols[None, :] < D)
    tl.store(ptr + (rows[:, None] * H + i_h) * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rows(ptr, rows, row_mask, H: tl.constexpr, i_h):
    """[len(rows)] values of a [tokens, H] tensor (a scalar gate, beta) for head i_h, fp32, zeros outside."""
    return tl.load(ptr + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32)


@triton.jit
def state_block(ptr, i_state, i_h, rows_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of the [len(rows_k), len(cols_v)] block of state i_state, head i_h, in a [*, H, K, V]
    tensor."""
    base = (i_state.to(tl.int64) * H + i_h) * K * V
    return ptr + base + rows_k[:, None] * V + cols_v[None, :], (rows_k[:, None] < K) & (cols_v[None, :] < V)


@triton.jit
def load_state(ptr, i_state, i_h, cols_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Block (cols_k x cols_v) of state i_state, head i_h, of a [*, H, K, V] tensor, fp32."""
    p, m = state_block(ptr, i_state, i_h, cols_k, cols_v, H, K, V)
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def store_state(ptr, value, i_state, i_h, cols_k, cols_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    p, m = state_block(ptr, i_state, i_h, cols_k, cols_v, H, K, V)
    tl.store(p, value.to(p.dtype.element_ty), mask=m)


@triton.jit
def load_scalar_cumsum(b, rows, valid, last, H: tl.constexpr, i_h):
    """Cumulative scalar gates of a chunk's rows and of its last valid row. Rows past the sequence's end
    continue the cumsum with g = 0: a 0 there would make exp(b_i - b_j) overflow."""
    b_last = tl.load(b + last * H + i_h)
    b_rows = tl.load(b + rows * H + i_h, mask=valid, other=0.0)
    return tl.where(valid, b_rows, b_last), b_last


@triton.jit
def decay(b, mask):
    """exp(b_i - b_j) where mask (j <= i there, so the exponent is <= 0), else 0."""
    return tl.exp(tl.where(mask, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def masked_exp(x, mask):
    """exp(x) where mask, else 0; x past a sequence's end may be positive and must not reach exp."""
    return tl.exp(tl.where(mask, x, float("-inf")))


@triton.jit
def dot(a, b, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with operands in the inputs' dtype (tensor cores for bf16), accumulated in fp32; fp32 inputs
    use exact fp32 dots (DOT_PRECISION = 'ieee', kernels.common.state_passes.dot_precision)."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=DOT_PRECISION)


@triton.jit
def unit_lower_inverse(b_a, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """T = (I + A)^{-1} of a strictly lower-triangular fp32 [BT, BT] A, BT = 64 (four 16x16 blocks): the delta
    rules' UT transform.

    First the 16x16 diagonal blocks D by forward substitution, the four blocks side by side (row i of every
    block at once): with X = D - I, X_r = -A_r - sum_{j<r} A_rj X_j. X is block-diagonal, so the rows i of the
    four blocks summed are one [BT] row holding each block's row in its own columns, and X_r's sum is an exact
    fp32 vector-matrix product (a [BT, BT] fp32 dot here would hold whole operand rows and columns in
    registers). Then, with L the blocks of A below the diagonal, I + A = (I + A_diag)(I + D L) and N = D L has
    N^4 = 0, so T = (I + N)^{-1} D = (I - N)(I + N^2) D: the same sums as block forward substitution, in four
    dots of the inputs' precision (exact fp32 for fp32 inputs; tf32 tensor cores for bf16 inputs, whose
    products with T are bf16 dots anyway)."""
    o_i = tl.arange(0, BT)
    same_block = (o_i // 16)[:, None] == (o_i // 16)[None, :]
    b_x = -tl.where(same_block, b_a, 0.0)
    for i in range(1, 16):
        rows_i = (o_i % 16 == i)[:, None]
        b_row = tl.sum(tl.where(rows_i, b_x, 0.0), axis=0)
        b_x = tl.where(rows_i & same_block, (b_row + tl.sum(b_row[:, None] * b_x, axis=0))[None, :], b_x)
    b_d = b_x + (o_i[:, None] == o_i[None, :]).to(tl.float32)
    b_n = tl.dot(b_d, tl.where(same_block, 0.0, b_a), input_precision=DOT_PRECISION)
    b_y = b_d + tl.dot(tl.dot(b_n, b_n, input_precision=DOT_PRECISION), b_d, input_precision=DOT_PRECISION)
    return b_y - tl.dot(b_n, b_y, input_precision=DOT_PRECISION)
