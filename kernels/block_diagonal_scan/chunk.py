"""The block-diagonal scan, chunked, in PyTorch: the CPU path, with its backward written out (the transposed scan).

The diagonal scan's schedule (kernels/diagonal_scan/chunk.py) with a 2x2 matrix per channel in place of a number:
each sequence's tokens in chunks of C=64 ([chunks, C, H, D, 2(, 2)]; the padding after a sequence's end is the
identity step A = I, b = 0). Within the chunks the scan from zero and the running product A_t ... A_first advance
one position at a time, all chunks at once; across chunks each chunk's map (A_C, h_C) is applied in turn, and
h = (A_t ... A_first) h_in + (the chunk's scan from zero). Products only: any matrix, singular ones too.
Backward: with g_t = dh_t + A_{t+1}^T g_{t+1} the total gradient of h_t and u_t = A_t^T g_t the gradient passed
to h_{t-1},
    u_t = A_t^T u_{t+1} + A_t^T dh_t,    u_{last+1} = d final state,    d initial_state = u_first,
the same scan over the reversed sequences with the transposed matrices; then db = g and dA_t = g_t h_{t-1}^T
(h recomputed, not kept).
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds
from kernels.diagonal_scan.chunk import previous


def matvec(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """a [..., 2, 2] times h [..., 2] per channel: [..., 2]."""
    return (a * h.unsqueeze(-2)).sum(-1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., 2, 2] times b [..., 2, 2] per channel."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def chunk_block_diagonal_scan_torch(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                                    output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T = b.shape[:2]
    bounds = tuple(sequence_bounds(cu_seqlens, B, T))
    h, final = ChunkedBlockDiagonalScan.apply(a, b, initial_state, bounds)
    return h, (final if output_final_state else None)


class ChunkedBlockDiagonalScan(torch.autograd.Function):
    """(h in b's dtype, final state in the compute dtype) of a [B, T, H, D, 2, 2], b [B, T, H, D, 2] over the
    sequences `bounds` of the flattened token axis; saves only the inputs."""

    @staticmethod
    def forward(ctx, a, b, initial_state, bounds):
        dtype = compute_dtype(a, b, initial_state)
        ctx.save_for_backward(a, b, initial_state)
        ctx.bounds = bounds
        ctx.set_materialize_grads(False)
        h, final = scan(_tokens(a, dtype), _tokens(b, dtype), _cast(initial_state, dtype), bounds)
        return h.view(b.shape).to(b.dtype), final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_h, d_final):
        a, b, initial_state = ctx.saved_tensors
        bounds = ctx.bounds
        dtype = compute_dtype(a, b, initial_state)
        a_flat, initial = _tokens(a, dtype), _cast(initial_state, dtype)
        d_h = torch.zeros(a_flat.shape[:-1], dtype=dtype, device=a.device) if d_h is None else _tokens(d_h, dtype)
        d_final = None if d_final is None else d_final.to(dtype)
        reversed_bounds = tuple(bounds[-1] - x for x in reversed(bounds))
        a_rev, d_h_rev = a_flat.flip(0).transpose(-1, -2), d_h.flip(0)
        d_final_rev = None if d_final is None else d_final.flip(0)
        u_rev, d_initial_rev = scan(a_rev, matvec(a_rev, d_h_rev), d_final_rev, reversed_bounds)
        grad = (d_h_rev + previous(u_rev, d_final_rev, reversed_bounds)).flip(0)  # g_t = dh_t + u_{t+1}
        h, _ = scan(a_flat, _tokens(b, dtype), initial, bounds)
        d_a = (grad.unsqueeze(-1) * previous(h, initial, bounds).unsqueeze(-2)).view(a.shape).to(a.dtype)
        d_b = grad.view(b.shape).to(b.dtype)
        d_initial = None if initial_state is None else d_initial_rev.flip(0).to(initial_state.dtype)
        return d_a, d_b, d_initial, None


def _tokens(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, ...] -> [B*T, ...] in the compute dtype."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).to(dtype)


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None,
         bounds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """h [tokens, H, D, 2] and the final states [N, H, D, 2] of h_t = A_t h_{t-1} + b_t over the sequences
    [bounds[n], bounds[n+1]) of a [tokens, H, D, 2, 2], b [tokens, H, D, 2].

    Each component is its own [C, chunks, H, D] tensor, the position within the chunk first, so that every step
    of the loop below is a few multiply-adds on contiguous [chunks, H, D] slices (the 2x2 products written out)."""
    layout = chunk_layout(list(bounds), CHUNK_SIZE, b.device)
    valid = layout.to_chunks(torch.ones(b.shape[0], 1, 1, dtype=torch.bool, device=b.device))  # [chunks, C, 1, 1]

    def positions_first(x: torch.Tensor, pad: float) -> torch.Tensor:  # [tokens, H, D] -> [C, chunks, H, D]
        return torch.where(valid, layout.to_chunks(x), pad).transpose(0, 1).contiguous()

    a = [positions_first(a[..., i, j], float(i == j)) for i in range(2) for j in range(2)]  # past the end: I
    h = [positions_first(b[..., i], 0.0) for i in range(2)]
    decay = [torch.empty_like(x) for x in a]  # A_t ... A_first
    for d, x in zip(decay, a):
        d[0] = x[0]
    a00, a01, a10, a11 = a
    d00, d01, d10, d11 = decay
    h0, h1 = h
    for t in range(1, CHUNK_SIZE):  # every chunk at once: position t from zero, and the product since the start
        h0[t].addcmul_(a00[t], h0[t - 1]).addcmul_(a01[t], h1[t - 1])
        h1[t].addcmul_(a10[t], h0[t - 1]).addcmul_(a11[t], h1[t - 1])
        torch.mul(a00[t], d00[t - 1], out=d00[t]).addcmul_(a01[t], d10[t - 1])
        torch.mul(a00[t], d01[t - 1], out=d01[t]).addcmul_(a01[t], d11[t - 1])
        torch.mul(a10[t], d00[t - 1], out=d10[t]).addcmul_(a11[t], d10[t - 1])
        torch.mul(a10[t], d01[t - 1], out=d11[t]).addcmul_(a11[t], d11[t - 1])
    eye = torch.eye(2, dtype=b.dtype, device=b.device)
    chunk_decay = layout.to_grid(torch.stack([d[-1] for d in decay], -1).unflatten(-1, (2, 2)) - eye, 0.0) + eye
    chunk_update = layout.to_grid(torch.stack([h0[-1], h1[-1]], -1), 0.0)  # [N, max_chunks, H, D, 2]
    state = initial_state if initial_state is not None else b.new_zeros(layout.num_seqs, *b.shape[1:])
    incoming = []
    for c in range(layout.max_chunks):
        incoming.append(state)
        state = matvec(chunk_decay[:, c], state) + chunk_update[:, c]
    if incoming:
        h_in = layout.from_grid(torch.stack(incoming, 1))  # [chunks, H, D, 2]
        in0, in1 = h_in[..., 0], h_in[..., 1]
        h0.addcmul_(d00, in0).addcmul_(d01, in1)
        h1.addcmul_(d10, in0).addcmul_(d11, in1)
    return layout.from_chunks(torch.stack([h0, h1], -1).transpose(0, 1)), state
