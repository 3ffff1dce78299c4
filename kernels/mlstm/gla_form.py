"""The stabilised mLSTM as a scalar-gate GLA: how every mLSTM op runs on GLA's kernels.

Divide the xLSTM memory by exp(m_t) (kernels/mlstm/naive.py). Then C~_t = C_t exp(-m_t) follows

    C~_t = exp(g_t) C~_{t-1} + (k_t exp(i_t - m_t)) v_t^T,     g_t = f_t + m_{t-1} - m_t <= 0,

GLA's recurrence with one log decay per head, a key scaled by at most 1 and a decay of at most 1: no
exponential anywhere exceeds 1, whatever the input gates. The normaliser n is the same recurrence with value 1,
so it is one more value column, and GLA's output on [v, 1] gives both C~^T q and n~ . q at once:
h_t = (C~^T q)_t / max(|n~ . q|_t, exp(-m_t)). m depends on the gates alone (not on C), as a max-plus scan:
    m_t = b_t + max(m_0, max_{s<=t} (i_s - b_s)),    b_t = f_1 + ... + f_t (within the sequence),
computed in fp64 (b grows with the sequence; the difference of two fp32 sums would lose digits), detached.
This is the chunkwise form of TFLA ("Tiled Flash Linear Attention", Beck et al. 2025) with the stabiliser of
the recurrent form (per step rather than per chunk); GLA's chunked PyTorch path and Triton kernels do the
chunking, forward and backward, with cu_seqlens and initial/final states.
"""
import torch

from kernels.common import compute_dtype, sequence_bounds
from kernels.mlstm.state import pack_state, split_state


def stabiliser(i: torch.Tensor, f: torch.Tensor, m0: torch.Tensor, cu_seqlens: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m [B, T, H], m_{t-1} [B, T, H], m at each sequence's end [N, H]), fp64 and detached, from the gates
    i, f [B, T, H] and the stabiliser m0 [N, H] each sequence starts from (m_end = m0 for an empty sequence).
    A decode step (one token per row) is the recurrence's one step, in the gates' dtype (nothing accumulates)."""
    if cu_seqlens is None and i.shape[1] == 1:
        with torch.no_grad():
            m0 = m0[:, None]
            m = torch.maximum(f + m0, i)
        return m, m0, m[:, 0]
    with torch.no_grad():
        i, f, m0 = i.detach().double(), f.detach().double(), m0.detach().double()
        B, T, H = i.shape
        if cu_seqlens is None:  # rows are the sequences
            to_grid, from_grid, lengths = (lambda x: x), (lambda x: x), torch.full((B,), T, device=i.device)
        else:  # one row of packed sequences -> [N, longest, H], padded after each sequence's end
            bounds = sequence_bounds(cu_seqlens, B, T)
            cu = cu_seqlens.to(i.device, torch.long)
            lengths = cu[1:] - cu[:-1]
            tokens = torch.arange(T, device=i.device)
            sequence = torch.searchsorted(cu[1:], tokens, right=True)
            position = tokens - cu[sequence]
            longest = max([0, *(b - a for a, b in zip(bounds, bounds[1:]))])

            def to_grid(x):
                return x.new_zeros(len(bounds) - 1, longest, H).index_put_((sequence, position), x[0])

            def from_grid(x):
                return x[sequence, position][None]
        b = to_grid(f).cumsum(1)
        m = b + torch.maximum(torch.cummax(to_grid(i) - b, dim=1).values, m0[:, None])
        m_previous = torch.cat([m0[:, None], m[:, :-1]], 1)
        if m.shape[1] == 0:
            return from_grid(m), from_grid(m_previous), m0
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, H)
        m_end = torch.where((lengths > 0)[:, None], m.gather(1, last).squeeze(1), m0)
        return from_grid(m), from_grid(m_previous), m_end


def gla_inputs(k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
               initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, num_states: int):
    """GLA's (k, v, g, initial state) for the mLSTM's inputs, and the stabiliser: (k exp(i - m), [v, 1],
    f + m_{t-1} - m_t, C~ | n~ of the initial state or None, m [B, T, H], m at each sequence's end [N, H])."""
    if initial_state is None:
        memory, m0 = None, i.new_zeros(num_states, i.shape[2])
    else:
        memory, m0 = split_state(initial_state)
    m, m_previous, m_end = stabiliser(i, f, m0, cu_seqlens)
    k = k * torch.exp(i - m.to(i.dtype)).unsqueeze(-1).to(k.dtype)
    g = f + (m_previous - m).to(f.dtype)
    v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    return k, v, g, memory, m, m_end


def normalised(o: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h = C~^T q / max(|n~ . q|, exp(-m)) from GLA's output on [v, 1] [B, T, H, V+1], computed in fp32 (fp64
    for fp64), returned in dtype."""
    o = o.to(compute_dtype(o))
    numerator, denominator = o.split([o.shape[-1] - 1, 1], -1)
    return (numerator / torch.maximum(denominator.abs(), torch.exp(-m.to(o.dtype)).unsqueeze(-1))).to(dtype)


def final_state(memory: torch.Tensor | None, m_end: torch.Tensor) -> torch.Tensor | None:
    return None if memory is None else pack_state(memory, m_end)


def total_log_forget(f: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """sum of f over each sequence [N, H] (differentiable): the log of the memory's true transition."""
    if cu_seqlens is None:
        return f.sum(1)
    cu = cu_seqlens.to(f.device, torch.long)
    sequence = torch.searchsorted(cu[1:], torch.arange(f.shape[1], device=f.device), right=True)
    return f.new_zeros(cu.numel() - 1, f.shape[2]).index_add(0, sequence, f[0])
