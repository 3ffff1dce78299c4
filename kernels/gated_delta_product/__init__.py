"""Gated DeltaProduct (Siems et al. 2025): n_h delta-rule (Householder) steps per token, the gate once per token.

    S_t = exp(g_t) prod_{j=1..n_h} (I - beta_tj k_tj k_tj^T) S_{t-1} + (the steps' writes beta_tj k_tj v_tj^T),
    o_t = scale * S_t^T q_t

As flash-linear-attention builds it, this is the gated delta rule over the interleaved sequence of T * n_h
sub-steps: token t's sub-steps carry its keys, values and betas, the log gate g_t on the first sub-step and 0
on the others, its query on the last one (zeros elsewhere); the output of the last sub-step is the token's.
Documents map to documents (cu_seqlens x n_h) and the state is the gated delta rule's [N, H, K, V], so every
entry point is the gated delta rule's own (chunked, fused recurrent for decoding, the state summary for
sequence parallelism) on the interleaved inputs, on every device, backward included.

Shapes: q [B, T, H, K]; k [B, T, n_h, H, K]; v [B, T, n_h, H, V]; g [B, T, H]; beta [B, T, n_h, H].
"""
import torch

from kernels.gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                      gated_delta_rule_state_summary)
from kernels.gated_delta_product.naive import naive_gated_delta_product


def _check(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
           q: torch.Tensor | None = None) -> None:
    if k.dim() != 5:
        raise ValueError(f"k must be [B, T, n_h, H, K] (n_h Householder steps per token), got {tuple(k.shape)}")
    B, T, n_h, H, K = k.shape
    expected = {"q": [B, T, H, K], "v": [B, T, n_h, H, v.shape[-1]], "g": [B, T, H], "beta": [B, T, n_h, H]}
    for name, x in (("q", q), ("v", v), ("g", g), ("beta", beta)):
        if x is not None and list(x.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]} for k of shape {list(k.shape)}, got {list(x.shape)}")


def _substeps(x: torch.Tensor) -> torch.Tensor:
    """[B, T, n_h, ...] -> [B, T * n_h, ...]: token t's sub-steps at t * n_h .. t * n_h + n_h - 1."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _gate_on_first(g: torch.Tensor, n_h: int) -> torch.Tensor:
    """The log gate [B, T, H] on each token's first sub-step, 0 (no decay) on the others: [B, T * n_h, H]."""
    return _substeps(torch.cat([g[:, :, None], g.new_zeros(g.shape[0], g.shape[1], n_h - 1, *g.shape[2:])], 2))


def _substep_cu_seqlens(cu_seqlens: torch.Tensor | None, n_h: int) -> torch.Tensor | None:
    """cu_seqlens x n_h, made once per batch and kept on cu_seqlens (as its chunk index is), knowing its host
    bounds when cu_seqlens does: every layer shares it and its chunk index, and no layer reads the device."""
    if cu_seqlens is None:
        return None
    known = getattr(cu_seqlens, "_substeps", None)
    if known is not None and known[:2] == (cu_seqlens._version, n_h):
        return known[2]
    substeps = cu_seqlens * n_h
    bounds = getattr(cu_seqlens, "_host_bounds", None)
    if bounds is not None and bounds[0] == cu_seqlens._version:
        substeps._host_bounds = (substeps._version, [b * n_h for b in bounds[1]])
    cu_seqlens._substeps = (cu_seqlens._version, n_h, substeps)
    return substeps


def _interleaved(op):
    """The gated delta rule op `op` (chunked or fused recurrent) as the Gated DeltaProduct op: same contract."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check(k, v, g, beta, q)
        B, T, n_h, H, K = k.shape
        # The query on the last sub-step only: the other sub-steps' outputs are never read.
        q_last = torch.cat([q.new_zeros(B, T, n_h - 1, H, K), q[:, :, None]], 2)
        o, final = op(_substeps(q_last), _substeps(k), _substeps(v), _gate_on_first(g, n_h), _substeps(beta),
                      scale=K ** -0.5 if scale is None else scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=_substep_cu_seqlens(cu_seqlens, n_h))
        return o.view(B, T, n_h, H, -1)[:, :, -1], final
    run.__name__ = op.__name__.replace("gated_delta_rule", "gated_delta_product")
    run.__doc__ = f"Gated DeltaProduct through {op.__name__} on the interleaved sub-steps (see the module docstring)."
    return run


chunk_gated_delta_product = _interleaved(chunk_gated_delta_rule)
fused_recurrent_gated_delta_product = _interleaved(fused_recurrent_gated_delta_rule)


def gated_delta_product_state_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                                      cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_local [N,H,K,V], transition M [N,H,K,K]) of each sequence, for sequence parallelism: the gated delta
    rule's summary of the interleaved sub-steps."""
    _check(k, v, g, beta)
    return gated_delta_rule_state_summary(_substeps(k), _substeps(v), _gate_on_first(g, k.shape[2]), _substeps(beta),
                                          cu_seqlens=_substep_cu_seqlens(cu_seqlens, k.shape[2]))


__all__ = ["chunk_gated_delta_product", "fused_recurrent_gated_delta_product", "gated_delta_product_state_summary",
           "naive_gated_delta_product"]
