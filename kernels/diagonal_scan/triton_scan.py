"""The diagonal scan, chunkwise, in Triton: forward and backward (the CUDA path), behind one custom op.

Chunks of BT = 64 tokens (ChunkIndex: every call variable-length, int64 offsets). Within a chunk the affine maps
h -> a_t h + b_t are composed by tl.associative_scan over a [BT, BD] tile (products only: any sign of a);
across chunks one program per (sequence, head, channel block) applies the chunks' maps in turn.
Forward:  chunk maps (A_C = prod a, h_C = the chunk's scan from zero) -> state pass (h_in, the state entering
          each chunk; the final state) -> output pass (h = cumprod(a) h_in + the chunk's scan from zero).
Backward: the transposed scan (chunk.py): u_t = a_t u_{t+1} + a_t dh_t run backwards, with u entering a chunk
          from its right u_in (d final state at a sequence's end) and d initial_state = u_first. The same three
          stages in reverse (the chunk maps' A_C are the forward's; w_C = the chunk's u at its first token from
          zero), then per chunk g_t = dh_t + u_{t+1}, db = g, da = g h_{t-1}: u_{t+1} and h_{t-1} come from
          scans over the tile's neighbouring rows, the chunk's own boundary rows replaced by u_in and h_in.
Nothing is stored but h, the gradients and two [num_chunks, H, D] fp32 maps; the forward states h_in are
recomputed in the backward. No kernel reads a buffer it writes.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex, chunk_index
from kernels.common.tiles import chunk_rows, load_block, store_block
from kernels.tuning import autotune

# Channel blocks of the [BT = 64, BD] tiles: 32 wide with 4 warps first, then 64 and 16.
TILE_CONFIGS = [triton.Config({"BD": 32}, num_warps=4), triton.Config({"BD": 64}, num_warps=4),
                triton.Config({"BD": 16}, num_warps=2)]
# The state pass holds one [BD] vector per program.
STATE_CONFIGS = [triton.Config({"BD": 64}, num_warps=2), triton.Config({"BD": 128}, num_warps=4),
                 triton.Config({"BD": 32}, num_warps=1)]


@triton.jit
def _compose(a_1, b_1, a_2, b_2):
    """The map (a_2, b_2) after (a_1, b_1): h -> a_2 (a_1 h + b_1) + b_2."""
    return a_1 * a_2, b_1 * a_2 + b_2


@triton.jit
def _row(x, o_i, i):
    """Row i of a [BT, BD] tile."""
    return tl.sum(tl.where((o_i == i)[:, None], x, 0.0), 0)


@triton.jit
def _load_state(ptr, i_state, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    return tl.load(ptr + (i_state.to(tl.int64) * H + i_h) * D + cols, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, value, i_state, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    tl.store(ptr + (i_state.to(tl.int64) * H + i_h) * D + cols, value.to(ptr.dtype.element_ty), mask=cols < D)


@autotune(TILE_CONFIGS, key=["H", "D", "REVERSE"])
@triton.jit
def scan_chunk_map_kernel(a, b, chunk_decay, chunk_update, cu_seqlens, chunk_indices, H: tl.constexpr,
                     D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
    """Each chunk's map from zero. Forward: A_C = prod a and h_C, the scan of (a, b) at the chunk's last token.
    REVERSE (b holds dh): w_C, the backward scan u_t = a_t u_{t+1} + a_t dh_t at its first token (A_C is the
    forward's)."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    o_i = tl.arange(0, BT)
    b_a = load_block(a, rows, valid, cols, H, D, i_h).to(tl.float32)
    b_b = load_block(b, rows, valid, cols, H, D, i_h).to(tl.float32)
    if REVERSE:  # rows past the end are (0, 0): the scan from the end starts from zero at the last token
        _, b_u = tl.associative_scan((b_a, b_a * b_b), 0, _compose, reverse=True)
        _store_state(chunk_update, _row(b_u, o_i, 0), i_c, i_h, cols, H, D)
    else:  # rows past the end are the identity (1, 0): the last row holds the whole chunk's map
        b_a = tl.where(valid[:, None], b_a, 1.0)
        b_decay, b_h = tl.associative_scan((b_a, b_b), 0, _compose)
        _store_state(chunk_decay, _row(b_decay, o_i, BT - 1), i_c, i_h, cols, H, D)
        _store_state(chunk_update, _row(b_h, o_i, BT - 1), i_c, i_h, cols, H, D)


@autotune(STATE_CONFIGS, key=["H", "D", "REVERSE", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def scan_state_kernel(chunk_decay, chunk_update, incoming, initial_state, final_state, cu_seqlens, chunk_offsets,
                      H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr,
                      USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr):
    """incoming[chunk] = the state entering each chunk (REVERSE: from its right), chunk by chunk along each
    sequence from initial_state (REVERSE: d final state) or zero; the state leaving the sequence in final_state."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    cols = i_d * BD + tl.arange(0, BD)
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    num_chunks = tl.cdiv(eos - bos, BT)
    state = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        state += _load_state(initial_state, i_n, i_h, cols, H, D)
    for i in range(0, num_chunks):
        if REVERSE:
            i_c = first_chunk + num_chunks - 1 - i
        else:
            i_c = first_chunk + i
        _store_state(incoming, state, i_c, i_h, cols, H, D)
        state = _load_state(chunk_decay, i_c, i_h, cols, H, D) * state + _load_state(chunk_update, i_c, i_h, cols,
                                                                                       H, D)
    if STORE_FINAL_STATE:
        _store_state(final_state, state, i_n, i_h, cols, H, D)


@autotune(TILE_CONFIGS, key=["H", "D"])
@triton.jit
def scan_output_kernel(a, b, h_in, h, cu_seqlens, chunk_indices, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                  BD: tl.constexpr):
    """h = cumprod(a) h_in + the chunk's scan from zero."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    b_a = load_block(a, rows, valid, cols, H, D, i_h).to(tl.float32)
    b_b = load_block(b, rows, valid, cols, H, D, i_h).to(tl.float32)
    b_decay, b_h = tl.associative_scan((b_a, b_b), 0, _compose)
    b_h += b_decay * _load_state(h_in, i_c, i_h, cols, H, D)[None, :]
    store_block(h, b_h, rows, valid, cols, H, D, i_h)


@autotune(TILE_CONFIGS, key=["H", "D"])
@triton.jit
def scan_grad_kernel(a, b, dh, h_in, u_in, da, db, cu_seqlens, chunk_indices, H: tl.constexpr, D: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    """g = dh_t + u_{t+1}, db = g, da = g h_{t-1}. h_{t-1} is the scan of the rows before (the chunk's first row
    replaced by (0, h_in)); u_{t+1} the backward scan of the rows after (its last row replaced by (0, u_in))."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, valid, last = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    cols = i_d * BD + tl.arange(0, BD)
    o_i = tl.arange(0, BT)
    col_ok = (cols < D)[None, :]
    # h_{t-1}: the scan of (a_{t-1}, b_{t-1}), at the chunk's first row (0, h_in).
    before = valid & (o_i > 0)
    first = (o_i == 0)[:, None]
    b_a = load_block(a, rows - 1, before, cols, H, D, i_h).to(tl.float32)
    b_b = load_block(b, rows - 1, before, cols, H, D, i_h).to(tl.float32)
    b_b = tl.where(first, _load_state(h_in, i_c, i_h, cols, H, D)[None, :], b_b)
    _, b_h_prev = tl.associative_scan((b_a, b_b), 0, _compose)
    # u_{t+1}: the backward scan of (a_{t+1}, a_{t+1} dh_{t+1}), at the chunk's last row (0, u_in).
    after = rows < last
    at_last = (rows == last)[:, None]
    b_a = load_block(a, rows + 1, after, cols, H, D, i_h).to(tl.float32)
    b_w = b_a * load_block(dh, rows + 1, after, cols, H, D, i_h).to(tl.float32)
    b_w = tl.where(at_last, _load_state(u_in, i_c, i_h, cols, H, D)[None, :], b_w)
    _, b_u_next = tl.associative_scan((b_a, b_w), 0, _compose, reverse=True)
    b_g = load_block(dh, rows, valid, cols, H, D, i_h).to(tl.float32) + b_u_next
    b_g = tl.where(valid[:, None] & col_ok, b_g, 0.0)
    store_block(db, b_g, rows, valid, cols, H, D, i_h)
    store_block(da, b_g * b_h_prev, rows, valid, cols, H, D, i_h)


# ---- launchers ---------------------------------------------------------------------------------------

def _tile_grid(D: int, chunks: ChunkIndex, H: int):
    return lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_chunks, H)  # noqa: E731


def _state_grid(D: int, chunks: ChunkIndex, H: int):
    return lambda meta: (triton.cdiv(D, meta["BD"]), chunks.num_sequences * H)  # noqa: E731


def chunk_maps(a, b, chunks: ChunkIndex, reverse: bool, chunk_decay=None):
    """(A_C, h_C) of every chunk, or with reverse (b = dh) (the given A_C, w_C); [num_chunks, H, D] fp32."""
    TT, H, D = b.shape
    f32 = dict(dtype=torch.float32, device=b.device)
    update = torch.empty(chunks.num_chunks, H, D, **f32)
    if chunk_decay is None:
        chunk_decay = torch.empty(chunks.num_chunks, H, D, **f32)
    if chunks.num_chunks:
        scan_chunk_map_kernel[_tile_grid(D, chunks, H)](a, b, chunk_decay, update, chunks.cu_seqlens,
                                                        chunks.chunk_indices, H=H, D=D, BT=CHUNK_SIZE, REVERSE=reverse)
    return chunk_decay, update


def state_pass(chunk_decay, chunk_update, initial_state, output_final_state: bool, chunks: ChunkIndex, reverse: bool):
    """(the state entering every chunk [num_chunks, H, D], the final state [N, H, D] or None), fp32."""
    _, H, D = chunk_decay.shape
    f32 = dict(dtype=torch.float32, device=chunk_decay.device)
    incoming = torch.empty(chunks.num_chunks, H, D, **f32)
    final = torch.empty(chunks.num_sequences, H, D, **f32) if output_final_state else None
    scan_state_kernel[_state_grid(D, chunks, H)](
        chunk_decay, chunk_update, incoming, initial_state, final, chunks.cu_seqlens, chunks.chunk_offsets, H=H, D=D,
        BT=CHUNK_SIZE, REVERSE=reverse, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state)
    return incoming, final


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B*T, H, D]: the kernels index tokens of the flattened batch."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def chunk_diagonal_scan_fwd(a, b, initial_state, output_final_state: bool, chunks: ChunkIndex):
    """(h [B, T, H, D] in b's dtype, final state or None) on [B, T, H, D] inputs."""
    a_flat, b_flat = _flatten(a), _flatten(b)
    TT, H, D = b_flat.shape
    chunk_decay, chunk_update = chunk_maps(a_flat, b_flat, chunks, reverse=False)
    # The final state is always stored (N x H x D floats): the forward state pass is then one compiled variant
    # with or without a final state asked for, shared with the backward's recomputation.
    h_in, final = state_pass(chunk_decay, chunk_update, initial_state, True, chunks, reverse=False)
    h = torch.empty_like(b_flat)
    if chunks.num_chunks:
        scan_output_kernel[_tile_grid(D, chunks, H)](a_flat, b_flat, h_in, h, chunks.cu_seqlens,
                                                     chunks.chunk_indices, H=H, D=D, BT=CHUNK_SIZE)
    return h.view(b.shape), (final if output_final_state else None)


def chunk_diagonal_scan_bwd(a, b, initial_state, dh, d_final_state, chunks: ChunkIndex):
    """(da, db, d initial_state or None); the forward's states recomputed."""
    a_flat, b_flat, dh_flat = _flatten(a), _flatten(b), _flatten(dh)
    TT, H, D = b_flat.shape
    chunk_decay, chunk_update = chunk_maps(a_flat, b_flat, chunks, reverse=False)
    h_in, _ = state_pass(chunk_decay, chunk_update, initial_state, True, chunks, reverse=False)
    _, chunk_grad = chunk_maps(a_flat, dh_flat, chunks, reverse=True, chunk_decay=chunk_decay)
    u_in, d_initial = state_pass(chunk_decay, chunk_grad, d_final_state, initial_state is not None, chunks,
                                 reverse=True)
    da, db = torch.empty_like(a_flat), torch.empty_like(b_flat)
    if chunks.num_chunks:
        scan_grad_kernel[_tile_grid(D, chunks, H)](a_flat, b_flat, dh_flat, h_in, u_in, da, db, chunks.cu_seqlens,
                                                   chunks.chunk_indices, H=H, D=D, BT=CHUNK_SIZE)
    if d_initial is not None:
        d_initial = d_initial.to(initial_state.dtype)
    return da.view(a.shape), db.view(b.shape), d_initial


# ---- the custom op (as kernels/common/custom_ops.py registers the others; this one has no q, k, v) ----------

FORWARD_SCHEMA = ("(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, bool output_final_state, "
                  "bool recurrent) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, Tensor dh, "
                   "Tensor? d_final_state) -> (Tensor, Tensor, Tensor)")


class ScanForwards:
    """The forward schedules of the op: chunkwise (here) and fused recurrent (set by fused_recurrent.py)."""
    chunk = staticmethod(chunk_diagonal_scan_fwd)
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
    final = b.new_empty(N, b.shape[2], b.shape[3], dtype=torch.float32)
    return b.new_empty(b.shape), final if output_final_state else _no_state(b)


def _backward_op(a, b, initial_state, cu_seqlens, dh, d_final_state):
    chunks = chunk_index(cu_seqlens, b.shape[0], b.shape[1], b.device)
    da, db, d_initial = chunk_diagonal_scan_bwd(a, b, initial_state, dh, d_final_state, chunks)
    return da.contiguous(), db.contiguous(), _no_state(b) if d_initial is None else d_initial.contiguous()


def _backward_fake(a, b, initial_state, cu_seqlens, dh, d_final_state):
    d_initial = _no_state(b) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return a.new_empty(a.shape), b.new_empty(b.shape), d_initial


_scan_op = torch.library.custom_op("baton::diagonal_scan", _forward_op, mutates_args=(), schema=FORWARD_SCHEMA)
_scan_op.register_fake(_forward_fake)
_scan_backward_op = torch.library.custom_op("baton::diagonal_scan_backward", _backward_op, mutates_args=(),
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
    da, db, d_initial = _scan_backward_op(a, b, initial_state, cu_seqlens, dh.contiguous(), d_final_state)
    return da, db, None if initial_state is None else d_initial, None, None, None


_scan_op.register_autograd(_differentiate, setup_context=_setup_context)


def diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state: bool, recurrent: bool):
    """baton::diagonal_scan on prepared inputs: (h, final state or None)."""
    h, final = _scan_op(a, b, initial_state, cu_seqlens, output_final_state, recurrent)
    return h, final if output_final_state else None


def prepare_inputs(a, b, initial_state):
    """Contiguous inputs and an fp32 initial state (the kernels' layout contract)."""
    initial_state = None if initial_state is None else initial_state.float().contiguous()
    return a.contiguous(), b.contiguous(), initial_state


def chunk_diagonal_scan_triton(a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as `kernels.chunk_diagonal_scan`."""
    a, b, initial_state = prepare_inputs(a, b, initial_state)
    return diagonal_scan_op(a, b, initial_state, cu_seqlens, output_final_state, False)
