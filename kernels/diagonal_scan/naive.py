"""The diagonal linear scan as the plain recurrence, one time step at a time: the ground truth.

    h_t = a_t * h_{t-1} + b_t      (elementwise; a_t any real number, negative included)

It accumulates in fp32 (fp64 for fp64 inputs), and doubles as the CPU decode path of
fused_recurrent_diagonal_scan (one step per token is all a decode step does).
"""
import torch

from kernels.common import compute_dtype, sequence_bounds


def naive_diagonal_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a, b [B,T,H,D]; states [N,H,D]. Returns (h [B,T,H,D] in b's dtype, final state or None)."""
    B, T, H, D = b.shape
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
    B, T, H, D = b.shape
    if state is None:
        state = b.new_zeros(B, H, D)
    outputs = []
    for t in range(T):
        state = a[:, t] * state + b[:, t]
        outputs.append(state)
    h = torch.stack(outputs, 1) if outputs else b.new_zeros(b.shape)
    return h, state
