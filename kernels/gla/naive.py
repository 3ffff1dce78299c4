"""Gated linear attention as the plain recurrence, one time step at a time: the ground truth.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

It accumulates in fp32 (fp64 for fp64 inputs), and doubles as the CPU decode path of
fused_recurrent_gla (one step per token is all a decode step does).
"""
import torch

from kernels.common import compute_dtype, sequence_bounds


def naive_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K] (vector gate) or [B,T,H] (scalar gate, log space)."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, initial_state), v.dtype
    q, k, v = (q.to(dtype) * scale), k.to(dtype), v.to(dtype)
    g = (g if g.dim() == 4 else g.unsqueeze(-1)).to(dtype)  # a scalar gate broadcasts over K
    state = initial_state.to(dtype) if initial_state is not None else None
    if cu_seqlens is None:  # the rows are the sequences and run side by side
        o, final = _recurrence(q, k, v, g, state)
    else:
        outputs, finals = [], []
        bounds = sequence_bounds(cu_seqlens, B, T)
        for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
            o_n, final_n = _recurrence(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos],
                                       None if state is None else state[n:n + 1])
            outputs.append(o_n)
            finals.append(final_n)
        o, final = torch.cat(outputs, 1), torch.cat(finals, 0)
    return o.to(out_dtype), (final if output_final_state else None)


def _recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over the rows of one batch (scale already applied to q)."""
    B, T, H, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    outputs = []
    for t in range(T):
        state = g[:, t].exp().unsqueeze(-1) * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(v.shape)
    return o, state
