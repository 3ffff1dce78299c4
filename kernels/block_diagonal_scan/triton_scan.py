"""The block-diagonal scan, chunkwise, in Triton: forward and backward (the CUDA path), behind one custom op.

The diagonal scan's kernels (kernels/diagonal_scan/triton_scan.py) with a 2x2 block per channel: a [tokens, H, D,
2, 2] and b, h [tokens, H, D, 2] are loaded as four and two [BT = 64, BD] tiles, one per component, and
tl.associative_scan composes the affine maps h -> A h + b over the six of them together ((Q, q) after (P, p) is
(QP, Qp + q): products only, any matrix). Across chunks one program per (sequence, head, channel block) applies
the chunks' maps in turn.
Forward:  chunk maps (A_C = A_last ... A_first, h_C = the chunk's scan from zero) -> state pass (h_in, the state
          entering each chunk; the final state) -> output pass (h = (A_t ... A_first) h_in + the scan from zero).
Backward: the transposed scan (chunk.py): u_t = A_t^T u_{t+1} + A_t^T dh_t run backwards, u entering a chunk from
          its right u_in (d final state at a sequence's end; the chunk's map is A_C^T) and d initial_state =
          u_first; then per chunk g_t = dh_t + u_{t+1}, db = g, dA_t = g_t h_{t-1}^T, with u_{t+1} and h_{t-1}
          from scans over the tile's neighbouring rows, the chunk's boundary rows replaced by u_in and h_in.
Nothing is stored but h, the gradients and the [num_chunks, H, D, 2(, 2)] fp32 maps; the forward states h_in are
recomputed in the backward. No kernel reads a buffer it writes.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex, chunk_index
from kernels.common.tiles import chunk_rows
from kernels.tuning import autotune

# Channel blocks of the [BT = 64, BD] tiles: six tiles of a map per scan (twelve in the gradient kernel), so
# narrower blocks than the diagonal scan's: 16 wide with 4 warps first, then 32 with 8 and 8 with 2.
TILE_CONFIGS = [triton.Config({"BD": 16}, num_warps=4), triton.Config({"BD": 32}, num_warps=8),
                triton.Config({"BD": 8}, num_warps=2)]
# The state pass holds one [BD] vector per component and program.
STATE_CONFIGS = [triton.Config({"BD": 64}, num_warps=2), triton.Config({"BD": 128}, num_warps=4),
                 triton.Config({"BD": 32}, num_warps=1)]


@triton.jit
def _compose(p00, p01, p10, p11, p0, p1, q00, q01, q10, q11, q0, q1):
    """The map (Q, q) after (P, p): h -> Q (P h + p) + q = (Q P) h + (Q p + q)."""
    return (q00 * p00 + q01 * p10, q00 * p01 + q01 * p11, q10 * p00 + q11 * p10, q10 * p01 + q11 * p11,
            q00 * p0 + q01 * p1 + q0, q10 * p0 + q11 * p1 + q1)


@triton.jit
def _row(x, o_i, i):
    """Row i of a [BT, BD] tile."""
    return tl.sum(tl.where((o_i == i)[:, None], x, 0.0), 0)


@triton.jit
def _load(ptr, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h, C: tl.constexpr, comp: tl.constexpr):
    """[len(rows), len(cols)] tile of component `comp` of a [tokens, H, D, C] tensor (C = 4: a block, 2: a
    vector) for head i_h, fp32, zeros outside."""
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + ((rows[:, None] * H + i_h) * D + cols[None, :]) * C + comp, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, value, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h, C: tl.constexpr,
           comp: tl.constexpr):
    mask = row_mask[:, None] & (cols[None, :] < D)
    tl.store(ptr + ((rows[:, None] * H + i_h) * D + cols[None, :]) * C + comp, value.to(ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _load_state(ptr, i_state, i_h, cols, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, comp: tl.constexpr):
    return tl.load(ptr + ((i_state.to(tl.int64) * H + i_h) * D + cols) * C + comp, mask=cols < D,
                   other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, value, i_state, i_h, cols, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                 comp: tl.constexpr):
    tl.store(ptr + ((i_state.to(tl.int64) * H + i_h) * D + cols) * C + comp, value.to(ptr.dtype.element_ty),
             mask=cols < D)


@triton.jit
def _load_map(a, b, rows, row_mask, cols, H: tl.constexpr, D: tl.constexpr, i_h):
    """The six tiles (A_00, A_01, A_10, A_11, b_0, b_1) of a chunk's rows."""
    return (_load(a, rows, row_mask, cols, H, D, i_h, 4, 0), _load(a, rows, row_mask, cols, H, D, i_h, 4, 1),
            _load(a, rows, row_mask, cols, H, D, i_h, 4, 2), _load(a, rows, row_mask, cols, H, D, i_h, 4, 3),
            _load(b, rows, row_mask, cols, H, D, i_h, 2, 0), _load(b, rows, row_mask, cols, H, D, i_h, 2, 1))


@autotune(TILE_CONFIGS, key=["H", "D", "REVERSE"])
@triton.jit
def block_scan_chunk_map_kernel(a, b, chunk_decay, chunk_update, cu_seqlens, chunk_indices, H: tl.constexpr,
                                D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
    """Each chunk's map from zero. Forward: A_C = A_last ... A_first and h_C, the scan of (A, b) at the chunk's
    last token. REVERSE (b holds dh): w_C, the backward scan u_t = A_t^T u_{t+1} + A_t^T dh_t at its first token
    (A_C is the forward's)."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    o_i = tl.arange(0, BT)
    a00, a01, a10, a11, b0, b1 = _load_map(a, b, rows, valid, cols, H, D, i_h)
    if REVERSE:  # the transposed blocks; rows past the end are (0, 0): the scan from the end starts from zero
        _, _, _, _, u0, u1 = tl.associative_scan((a00, a10, a01, a11, a00 * b0 + a10 * b1, a01 * b0 + a11 * b1), 0,
                                                 _compose, reverse=True)
        _store_state(chunk_update, _row(u0, o_i, 0), i_c, i_h, cols, H, D, 2, 0)
        _store_state(chunk_update, _row(u1, o_i, 0), i_c, i_h, cols, H, D, 2, 1)
    else:  # rows past the end are the identity (I, 0): the last row holds the whole chunk's map
        a00 = tl.where(valid[:, None], a00, 1.0)
        a11 = tl.where(valid[:, None], a11, 1.0)
        d00, d01, d10, d11, h0, h1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, _compose)
        _store_state(chunk_decay, _row(d00, o_i, BT - 1), i_c, i_h, cols, H, D, 4, 0)
        _store_state(chunk_decay, _row(d01, o_i, BT - 1), i_c, i_h, cols, H, D, 4, 1)
        _store_state(chunk_decay, _row(d10, o_i, BT - 1), i_c, i_h, cols, H, D, 4, 2)
        _store_state(chunk_decay, _row(d11, o_i, BT - 1), i_c, i_h, cols, H, D, 4, 3)
        _store_state(chunk_update, _row(h0, o_i, BT - 1), i_c, i_h, cols, H, D, 2, 0)
        _store_state(chunk_update, _row(h1, o_i, BT - 1), i_c, i_h, cols, H, D, 2, 1)


@autotune(STATE_CONFIGS, key=["H", "D", "REVERSE", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def block_scan_state_kernel(chunk_decay, chunk_update, incoming, initial_state, final_state, cu_seqlens,
                            chunk_offsets, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                            REVERSE: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                            STORE_FINAL_STATE: tl.constexpr):
    """incoming[chunk] = the state entering each chunk (REVERSE: from its right, through A_C^T), chunk by chunk
    along each sequence from initial_state (REVERSE: d final state) or zero; the state leaving it in final_state."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    cols = i_d * BD + tl.arange(0, BD)
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    num_chunks = tl.cdiv(eos - bos, BT)
    s0 = tl.zeros([BD], dtype=tl.float32)
    s1 = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        s0 += _load_state(initial_state, i_n, i_h, cols, H, D, 2, 0)
        s1 += _load_state(initial_state, i_n, i_h, cols, H, D, 2, 1)
    for i in range(0, num_chunks):
        if REVERSE:
            i_c = first_chunk + num_chunks - 1 - i
        else:
            i_c = first_chunk + i
        _store_state(incoming, s0, i_c, i_h, cols, H, D, 2, 0)
        _store_state(incoming, s1, i_c, i_h, cols, H, D, 2, 1)
        m00 = _load_state(chunk_decay, i_c, i_h, cols, H, D, 4, 0)
        m01 = _load_state(chunk_decay, i_c, i_h, cols, H, D, 4, 1)
        m10 = _load_state(chunk_decay, i_c, i_h, cols, H, D, 4, 2)
        m11 = _load_state(chunk_decay, i_c, i_h, cols, H, D, 4, 3)
        if REVERSE:  # A_C^T
            m01, m10 = m10, m01
        n0 = m00 * s0 + m01 * s1 + _load_state(chunk_update, i_c, i_h, cols, H, D, 2, 0)
        s1 = m10 * s0 + m11 * s1 + _load_state(chunk_update, i_c, i_h, cols, H, D, 2, 1)
        s0 = n0
    if STORE_FINAL_STATE:
        _store_state(final_state, s0, i_n, i_h, cols, H, D, 2, 0)
        _store_state(final_state, s1, i_n, i_h, cols, H, D, 2, 1)


@autotune(TILE_CONFIGS, key=["H", "D"])
@triton.jit
def block_scan_output_kernel(a, b, h_in, h, cu_seqlens, chunk_indices, H: tl.constexpr, D: tl.constexpr,
                             BT: tl.constexpr, BD: tl.constexpr):
    """h = (A_t ... A_first) h_in + the chunk's scan from zero."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    d00, d01, d10, d11, h0, h1 = tl.associative_scan(_load_map(a, b, rows, valid, cols, H, D, i_h), 0, _compose)
    in0 = _load_state(h_in, i_c, i_h, cols, H, D, 2, 0)[None, :]
    in1 = _load_state(h_in, i_c, i_h, cols, H, D, 2, 1)[None, :]
    _store(h, h0 + d00 * in0 + d01 * in1, rows, valid, cols, H, D, i_h, 2, 0)
    _store(h, h1 + d10 * in0 + d11 * in1, rows, valid, cols, H, D, i_h, 2, 1)


@autotune(TILE_CONFIGS, key=["H", "D"])
@triton.jit
def block_scan_grad_kernel(a, b, dh, h_in, u_in, da, db, cu_seqlens, chunk_indices, H: tl.constexpr,
                           D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """g = dh_t + u_{t+1}, db = g, dA = g h_{t-1}^T. h_{t-1} is the scan of the rows before (the chunk's first row
    replaced by (0, h_in)); u_{t+1} the backward scan of the rows after (its last row replaced by (0, u_in))."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    o_i = tl.arange(0, BT)
    keep = valid[:, None] & (cols < D)[None, :]
    # h_{t-1}: the scan of (A_{t-1}, b_{t-1}), at the chunk's first row (0, h_in).
    first = (o_i == 0)[:, None]
    a00, a01, a10, a11, b0, b1 = _load_map(a, b, rows - 1, valid & (o_i > 0), cols, H, D, i_h)
    b0 = tl.where(first, _load_state(h_in, i_c, i_h, cols, H, D, 2, 0)[None, :], b0)
    b1 = tl.where(first, _load_state(h_in, i_c, i_h, cols, H, D, 2, 1)[None, :], b1)
    _, _, _, _, p0, p1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, _compose)
    # u_{t+1}: the backward scan of (A_{t+1}^T, A_{t+1}^T dh_{t+1}), at the chunk's last row (0, u_in).
    at_last = (rows == last)[:, None]
    a00, a01, a10, a11, d0, d1 = _load_map(a, dh, rows + 1, rows < last, cols, H, D, i_h)
    w0 = tl.where(at_last, _load_state(u_in, i_c, i_h, cols, H, D, 2, 0)[None, :], a00 * d0 + a10 * d1)
    w1 = tl.where(at_last, _load_state(u_in, i_c, i_h, cols, H, D, 2, 1)[None, :], a01 * d0 + a11 * d1)
    _, _, _, _, n0, n1 = tl.associative_scan((a00, a10, a01, a11, w0, w1), 0, _compose, reverse=True)
    g0 = tl.where(keep, _load(dh, rows, valid, cols, H, D, i_h, 2, 0) + n0, 0.0)
    g1 = tl.where(keep, _load(dh, rows, valid, cols, H, D, i_h, 2, 1) + n1, 0.0)
    _store(db, g0, rows, valid, cols, H, D, i_h, 2, 0)
    _store(db, g1, rows, valid, cols, H, D, i_h, 2, 1)
    _store(da, g0 * p0, rows, valid, cols, H, D, i_h, 4, 0)
    _store(da, g0 * p1, rows, valid, cols, H, D, i_h, 4, 1)
    _store(da, g1 * p0, rows, valid, cols, H, D, i_h, 4, 2)
    _store(da, g1 * p1, rows, valid, cols, H, D, i_h, 4, 3)


# ---- launchers ---------------------------------------------------------------------------------------

def _tile_grid(D: int, chunks: ChunkIndex, H: int):
    return lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_chunks, H)  # noqa: E731


def _state_grid(D: int, chunks: ChunkIndex, H: int):
    return lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_sequences * H)  # noqa: E731


def chunk_maps(a, b, chunks: ChunkIndex, reverse: bool, chunk_decay=None):
    """(A_C [num_chunks, H, D, 2, 2], h_C [num_chunks, H, D, 2]) of every chunk, or with reverse (b = dh) (the
    given A_C, w_C); fp32."""
    TT, H, D, _ = b.shape
    f32 = dict(dtype=torch.float32, device=b.device)
    update = torch.empty(chunks.num_chunks, H, D, 2, **f32)
    if chunk_decay is None:
        chunk_decay = torch.empty(chunks.num_chunks, H, D, 2, 2, **f32)
    if chunks.num_chunks:
        block_scan_chunk_map_kernel[_tile_grid(D, chunks, H)](a, b, chunk_decay, update, chunks.cu_seqlens,
                                                              chunks.chunk_indices, H=H, D=D, BT=CHUNK_SIZE,
                                                              REVERSE=reverse)
    return chunk_decay, update


def state_pass(chunk_decay, chunk_update, initial_state, output_final_state: bool, chunks: ChunkIndex, reverse: bool):
    """(the state entering every chunk [num_chunks, H, D, 2], the final state [N, H, D, 2] or None), fp32."""
    _, H, D, _ = chunk_update.shape
    f32 = dict(dtype=torch.float32, device=chunk_update.device)
    incoming = torch.empty(chunks.num_chunks, H, D, 2, **f32)
    final = torch.empty(chunks.num_sequences, H, D, 2, **f32) if output_final_state else None
    block_scan_state_kernel[_state_grid(D, chunks, H)](
        chunk_decay, chunk_update, incoming, initial_state, final, chunks.cu_seqlens, chunks.chunk_offsets, H=H,
        D=D, BT=CHUNK_SIZE, REVERSE=reverse, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state)
    return incoming, final


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> contiguous [B*T, ...]: the kernels index tokens of the flattened batch."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def chunk_block_diagonal_scan_fwd(a, b, initial_state, output_final_state: bool, chunks: ChunkIndex):
    """(h [B, T, H, D, 2] in b's dtype, final state or None)."""
    a_flat, b_flat = _flatten(a), _flatten(b)
    TT, H, D, _ = b_flat.shape
    chunk_decay, chunk_update = chunk_maps(a_flat, b_flat, chunks, reverse=False)
    # The final state is always stored: one compiled state pass with or without it asked for (as the diagonal's).
    h_in, final = state_pass(chunk_decay, chunk_update, initial_state, True, chunks, reverse=False)
    h = torch.empty_like(b_flat)
    if chunks.num_chunks:
        block_scan_output_kernel[_tile_grid(D, chunks, H)](a_flat, b_flat, h_in, h, chunks.cu_seqlens,
                                                           chunks.chunk_indices, H=H, D=D, BT=CHUNK_SIZE)
    return h.view(b.shape), (final if output_final_state else None)


def chunk_block_diagonal_scan_bwd(a, b, initial_state, dh, d_final_state, chunks: ChunkIndex):
    """(da, db, d initial_state or None); the forward's states recomputed."""
    a_flat, b_flat, dh_flat = _flatten(a), _flatten(b), _flatten(dh)
    TT, H, D, _ = b_flat.shape
    chunk_decay, chunk_update = chunk_maps(a_flat, b_flat, chunks, reverse=False)
    h_in, _ = state_pass(chunk_decay, chunk_update, initial_state, True, chunks, reverse=False)
    _, chunk_grad = chunk_maps(a_flat, dh_flat, chunks, reverse=True, chunk_decay=chunk_decay)
    u_in, d_initial = state_pass(chunk_decay, chunk_grad, d_final_state, initial_state is not None, chunks,
                                 reverse=True)
    da, db = torch.empty_like(a_flat), torch.empty_like(b_flat)
    if chunks.num_chunks:
        block_scan_grad_kernel[_tile_grid(D, chunks, H)](a_flat, b_flat, dh_flat, h_in, u_in, da, db,
                                                         chunks.cu_seqlens, chunks.chunk_indices, H=H, D=D,
                                                         BT=CHUNK_SIZE)
    if d_initial is not None:
        d_initial = d_initial.to(initial_state.dtype)
    return da.view(a.shape), db.view(b.shape), d_initial


# ---- the custom op (as kernels/diagonal_scan/triton_scan.py registers the diagonal one) ----------------------

FORWARD_SCHEMA = ("(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, bool output_final_state, "
                  "bool recurrent) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, Tensor dh, "
                   "Tensor? d_final_state) -> (Tensor, Tensor, Tensor)")


class ScanForwards:
    """The forward schedules of the op: chunkwise (here) and fused recurrent (set by fused_recurrent.py)."""
    chunk = staticmethod(chunk_block_diagonal_scan_fwd)
    recurrent = None


def _no_state(x: torch.Tensor) -> torch.Tensor:
    """What stands for an absent state: ops cannot return None."""
    return x.new_empty(0, dtype=torch.float32)


def _forward_op(a, b, initial_state, cu_seqlens, output_final_state, recurrent):
    chunks = chunk_index(cu_seqlens, b.shape[0], b.shape[1], b.device)
    forward = ScanForwards.recurrent if recurrent else ScanForwards.chunk
    h, final = forward(a, b, initial_state, output_final_state, chunks)
    return h.contiguous(), _no_state(b) if final is None else final.contiguous()


def _forward_fake(a, b, initial_state, cu_seqlens, output_final_state, recurrent):
    N = b.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = b.new_empty(N, b.shape[2], b.shape[3], 2, dtype=torch.float32)
    return b.new_empty(b.shape), final if output_final_state else _no_state(b)


def _backward_op(a, b, initial_state, cu_seqlens, dh, d_final_state):
    chunks = chunk_index(cu_seqlens, b.shape[0], b.shape[1], b.device)
    da, db, d_initial = chunk_block_diagonal_scan_bwd(a, b, initial_state, dh, d_final_state, chunks)
    return da.contiguous(), db.contiguous(), _no_state(b) if d_initial is None else d_initial.contiguous()


def _backward_fake(a, b, initial_state, cu_seqlens, dh, d_final_state):
    d_initial = _no_state(b) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return a.new_empty(a.shape), b.new_empty(b.shape), d_initial


_scan_op = torch.library.custom_op("baton::block_diagonal_scan", _forward_op, mutates_args=(),
                                   schema=FORWARD_SCHEMA)
_scan_op.register_fake(_forward_fake)
_scan_backward_op = torch.library.custom_op("baton::block_diagonal_scan_backward", _backward_op, mutates_args=(),
                                            schema=BACKWARD_SCHEMA)
_scan_backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    a, b, initial_state, cu_seqlens, _, _ = inputs
    ctx.save_for_backward(a, b, initial_state, cu_seqlens)


def _differentiate(ctx, dh, d_final_state):
    a, b, initial_state, cu_seqlens = ctx.saved_tensors
    if d_final_state is not None and d_final_state.numel() == 0:
        d_final_state = None
    elif d_final_state is not None:
        d_final_state = d_final_state.float().contiguous()
    if dh is None:
        dh = torch.zeros_like(b)
    da, db, d_initial = _scan_backward_op(a, b, initial_state, cu_seqlens, dh.contiguous(), d_final_state)
    return da, db, None if initial_state is None else d_initial, None, None, None


_scan_op.register_autograd(_differentiate, setup_context=_setup_context)


def block_diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state: bool, recurrent: bool):
    """baton::block_diagonal_scan on prepared inputs: (h, final state or None)."""
    h, final = _scan_op(a, b, initial_state, cu_seqlens, output_final_state, recurrent)
    return h, final if output_final_state else None


def prepare_inputs(a, b, initial_state):
    """Contiguous inputs and an fp32 initial state (the kernels' layout contract)."""
    initial_state = None if initial_state is None else initial_state.float().contiguous()
    return a.contiguous(), b.contiguous(), initial_state


def chunk_block_diagonal_scan_triton(a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as `kernels.block_diagonal_scan.chunk_block_diagonal_scan`."""
    a, b, initial_state = prepare_inputs(a, b, initial_state)
    return block_diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state, False)
