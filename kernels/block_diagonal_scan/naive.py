"""The block-diagonal scan token by token: the reference of the tests and the decode path on CPU."""
import torch

from kernels.common import compute_dtype, sequence_bounds


def matvec(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """a [..., 2, 2] times h [..., 2] per channel: [..., 2]."""
    return (a * h.unsqueeze(-2)).sum(-1)


def naive_block_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a [B,T,H,D,2,2], b [B,T,H,D,2]; states [N,H,D,2]. Returns (h [B,T,H,D,2] in b's dtype, final state or
    None)."""
    B, T = b.shape[:2]
    dtype, out_dtype = compute_dtype(a, b, initial_state), b.dtype
    a, b = a.to(dtype), b.to(dtype)
    state = initial_state.to(dtype) if initial_state is not None else None
    if cu_seqlens is None:  # the rows are the sequences and run side by side
        h, final = _recurrence(a, b, state)
    else:
        outputs, finals = [], []
        bounds = sequence_bounds(cu_seqlens, B, T)
        for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
            h_n, final_n = _recurrence(a[:, bos:eos], b[:, bos:eos], None if state is None else state[n:n + 1])
            outputs.append(h_n)
            finals.append(final_n)
        h, final = torch.cat(outputs, 1), torch.cat(finals, 0)
    return h.to(out_dtype), (final if output_final_state else None)


def _recurrence(a: torch.Tensor, b: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over the rows of one batch."""
    if state is None:
        state = b.new_zeros(b.shape[0], *b.shape[2:])
    outputs = []
    for t in range(b.shape[1]):
        state = matvec(a[:, t], state) + b[:, t]
        outputs.append(state)
    h = torch.stack(outputs, 1) if outputs else b.new_zeros(b.shape)
    return h, state
