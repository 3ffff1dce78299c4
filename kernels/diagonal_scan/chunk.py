"""The diagonal scan, chunked, in PyTorch: the CPU path, with its backward written out (the transposed scan).

Forward: each sequence's tokens in chunks of C=64 ([chunks, C, H, D]; the padding after a sequence's end is
a = 1, b = 0, an identity step). Within the chunks the scan from zero and the running product of a advance one
position at a time, all chunks at once (C steps of in-place multiply-adds, each element touched once: a doubling
scan's log2(C) rounds would rewrite every element each round); products only, no division and no logarithm, so
negative and zero a_t are exact. Across chunks each chunk's map (A_C, h_C) is applied in turn, one step per
chunk (the other ops' state scan), and h = A_t h_in + (the chunk's scan from zero).
Backward: the gradient of a linear scan is the same scan run backwards (the transposed system). With
u_t = a_t g_t the gradient passed to h_{t-1} and g_t = dh_t + u_{t+1} the total gradient of h_t,
    u_t = a_t u_{t+1} + a_t dh_t,    u_{last+1} = d final state,    d initial_state = u_first,
i.e. the forward scan over the reversed sequences; then db = g and da = g * h_{t-1} (h recomputed, not kept).
Reversing the flattened token axis reverses every sequence (and their order), so one routine serves both.
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds


def chunk_diagonal_scan_torch(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T = b.shape[:2]
    bounds = tuple(sequence_bounds(cu_seqlens, B, T))
    h, final = ChunkedDiagonalScan.apply(a, b, initial_state, bounds)
    return h, (final if output_final_state else None)


class ChunkedDiagonalScan(torch.autograd.Function):
    """(h in b's dtype, final state in the compute dtype) of a, b [B, T, H, D] over the sequences `bounds` of
    the flattened token axis; saves only the inputs."""

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
        d_h = torch.zeros_like(a_flat) if d_h is None else _tokens(d_h, dtype)
        d_final = None if d_final is None else d_final.to(dtype)
        reversed_bounds = tuple(bounds[-1] - x for x in reversed(bounds))
        a_rev, d_h_rev = a_flat.flip(0), d_h.flip(0)
        d_final_rev = None if d_final is None else d_final.flip(0)
        u_rev, d_initial_rev = scan(a_rev, a_rev * d_h_rev, d_final_rev, reversed_bounds)
        grad = (d_h_rev + previous(u_rev, d_final_rev, reversed_bounds)).flip(0)  # g_t = dh_t + u_{t+1}
        h, _ = scan(a_flat, _tokens(b, dtype), initial, bounds)
        d_a = (grad * previous(h, initial, bounds)).view(a.shape).to(a.dtype)
        d_b = grad.view(b.shape).to(b.dtype)
        d_initial = None if initial_state is None else d_initial_rev.flip(0).to(initial_state.dtype)
        return d_a, d_b, d_initial, None


def _tokens(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B*T, H, D] in the compute dtype."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).to(dtype)


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None,
         bounds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """h [tokens, H, D] and the final states [N, H, D] of h_t = a_t h_{t-1} + b_t over the sequences
    [bounds[n], bounds[n+1]) of a, b [tokens, H, D]."""
    layout = chunk_layout(list(bounds), CHUNK_SIZE, b.device)
    valid = layout.to_chunks(torch.ones(b.shape[0], 1, 1, dtype=torch.bool, device=b.device))
    decay = torch.where(valid, layout.to_chunks(a), 1.0)  # [chunks, C, H, D], fresh: updated in place below
    h = layout.to_chunks(b)
    for t in range(1, CHUNK_SIZE):  # every chunk at once: position t from zero, and the decay since the start
        h[:, t].addcmul_(decay[:, t], h[:, t - 1])
        decay[:, t].mul_(decay[:, t - 1])
    chunk_decay = layout.to_grid(decay[:, -1], 1.0)  # [N, max_chunks, H, D]
    chunk_update = layout.to_grid(h[:, -1], 0.0)
    state = initial_state if initial_state is not None else b.new_zeros(layout.num_seqs, *b.shape[1:])
    incoming = []
    for c in range(layout.max_chunks):
        incoming.append(state)
        state = torch.addcmul(chunk_update[:, c], chunk_decay[:, c], state)
    if incoming:
        h = torch.addcmul(h, decay, layout.from_grid(torch.stack(incoming, 1)).unsqueeze(1))
    return layout.from_chunks(h), state


def previous(h: torch.Tensor, initial_state: torch.Tensor | None, bounds: tuple[int, ...]) -> torch.Tensor:
    """h_{t-1} of every token of h [tokens, H, D]: at a sequence's first token its initial state (or zero)."""
    shifted = torch.cat([h.new_zeros(1, *h.shape[1:]), h[:-1]])
    firsts = [(n, start) for n, (start, end) in enumerate(zip(bounds, bounds[1:])) if end > start]
    if firsts:
        sequences, rows = (torch.tensor(x, device=h.device) for x in zip(*firsts))
        shifted[rows] = 0.0 if initial_state is None else initial_state[sequences]
    return shifted
