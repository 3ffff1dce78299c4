"""The backward direction as the forward op on reversed sequences: reversal within each sequence and the decays
the backward recurrence uses, for the chunked and recurrent forms and for sequence parallelism.

A sequence is a row ([B, T] without cu_seqlens) or a segment of cu_seqlens over the flattened tokens ([1, N]).
Reversing keeps every sequence where it is and reverses its tokens, so cu_seqlens is the same before and after
and reversing twice is the identity. The backward recurrence S^B_i = diag(lambda_{i+1}) S^B_{i+1} + k_i v_i^T
decays by the next token's gate: in the original order its gates are h_i = g_{i+1}, and 0 at a sequence's last
token (where the state starts from zero, or, under sequence parallelism, from the following rank's state, which
that rank has already decayed by its first token's gate). The indices are built on the device from cu_seqlens
(no host read).
"""
import torch


def _order(cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reversed position of every token [N], whether it has a next token in its sequence [N])."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    t = torch.arange(num_tokens, device=device)
    sequence = torch.searchsorted(bounds, t, right=True) - 1
    start, end = bounds[sequence], bounds[sequence + 1]
    return start + end - 1 - t, t + 1 < end


def reverse_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, ...] with each sequence's tokens in reverse order (its own inverse)."""
    if cu_seqlens is None:
        return x.flip(1)
    reverse, _ = _order(cu_seqlens, x.shape[1], x.device)
    return x.index_select(1, reverse)


def backward_gates(g: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The backward recurrence's log decays in the original order: h_i = g_{i+1} within a sequence, 0 at its end."""
    if cu_seqlens is None:
        return torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], 1)
    _, has_next = _order(cu_seqlens, g.shape[1], g.device)
    following = (torch.arange(g.shape[1], device=g.device) + 1).clamp(max=max(g.shape[1] - 1, 0))
    keep = has_next.view(1, -1, *(1,) * (g.dim() - 2))
    return torch.where(keep, g.index_select(1, following), torch.zeros((), dtype=g.dtype, device=g.device))
