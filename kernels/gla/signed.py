"""GLA with a signed scalar decay: S_t = a_t S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, a_t in (-1, 1).

Negative eigenvalues (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues") for Mamba2's transition. The kernels work in log space, where a sign cannot live; it moves to
q and k instead. With sigma_t the product of the signs of a over the sequence up to t (1 before its first
token), S'_t = sigma_t S_t follows the positive recurrence

    S'_t = |a_t| S'_{t-1} + (sigma_t k_t) v_t^T,    o_t = scale * S'^T_t (sigma_t q_t),

so each op runs GLA's own on g = log|a| with q and k signed by sigma, and the final state is sigma_end S'_end
(an initial state enters unchanged: sigma = 1 before the first token). The gates are g = log|a| [B, T, H] and
sign = +-1 [B, T, H] (no gradient); the state contract is GLA's, so packing, decoding and sequence
parallelism (the summary's transition is sigma_end * prod |a|) work as they do for every op.
"""
import torch
import torch.nn.functional as F

from kernels.gla import chunk_gla, chunk_gla_vjp, fused_recurrent_gla, gla_state_summary


def cumulative_sign(sign: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [B, T, H]: the product of sign over each sequence up to t, and sigma_end [N, H] at each sequence's
    end (1 for an empty one), from counts of negative signs (no host sync)."""
    negative = (sign < 0).to(torch.int32)
    before = F.pad(negative.cumsum(1), (0, 0, 1, 0))  # [B, T+1, H]: negatives before each index
    if cu_seqlens is None:
        count, at_end = before[:, 1:], before[:, -1]
    else:
        cu = cu_seqlens.long()
        tokens = torch.arange(sign.shape[1], device=sign.device)
        start = cu[torch.searchsorted(cu, tokens, right=True) - 1]  # each token's sequence start
        count = before[:, 1:] - before[:, start]
        at_end = (before[0, cu[1:]] - before[0, cu[:-1]])  # [N, H]
    parity_sign = lambda n: (1 - 2 * (n % 2)).to(sign.dtype)  # noqa: E731
    return parity_sign(count), parity_sign(at_end)


def _signed(q: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = sigma[..., None].to(q.dtype)
    return q * sigma, k * sigma


def _final(final: torch.Tensor | None, sigma_end: torch.Tensor) -> torch.Tensor | None:
    return None if final is None else final * sigma_end[..., None, None].to(final.dtype)


def chunk_gla_signed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, sign: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """chunk_gla with the decay sign * exp(g): g = log|a| and sign [B, T, H]."""
    sigma, sigma_end = cumulative_sign(sign, cu_seqlens)
    o, final = chunk_gla(*_signed(q, k, sigma), v, g, scale, initial_state, output_final_state, cu_seqlens)
    return o, _final(final, sigma_end)


def fused_recurrent_gla_signed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               sign: torch.Tensor, scale: float | None = None,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_recurrent_gla (decoding) with the decay sign * exp(g)."""
    sigma, sigma_end = cumulative_sign(sign, cu_seqlens)
    o, final = fused_recurrent_gla(*_signed(q, k, sigma), v, g, scale, initial_state, output_final_state,
                                   cu_seqlens)
    return o, _final(final, sigma_end)


def chunk_gla_signed_vjp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, sign: torch.Tensor,
                         do: torch.Tensor, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None) -> tuple:
    """chunk_gla_signed's (dq, dk, dv, [dg, dsign = 0], d initial_state or None) for the output gradient do
    (chunk_gla_vjp's contract)."""
    sigma, _ = cumulative_sign(sign, cu_seqlens)
    dq, dk, dv, (dg,), d_initial = chunk_gla_vjp(*_signed(q, k, sigma), v, g, do, scale, cu_seqlens, initial_state)
    dq, dk = _signed(dq, dk, sigma)
    return dq, dk, dv, [dg, torch.zeros_like(sign)], d_initial


def gla_signed_state_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, sign: torch.Tensor,
                             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gla_state_summary with the decay sign * exp(g): (S_local [N, H, K, V], transition [N, H]), signed."""
    sigma, sigma_end = cumulative_sign(sign, cu_seqlens)
    state, transition = gla_state_summary(_signed(k, k, sigma)[1], v, g, cu_seqlens)
    return state * sigma_end[..., None, None].to(state.dtype), transition * sigma_end.to(transition.dtype)
