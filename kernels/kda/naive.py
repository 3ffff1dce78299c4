"""Kimi Delta Attention (KDA) as the plain recurrence, one time step at a time: the ground truth.

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

computed as S' = exp(g_t)[:, None] * S_{t-1} (each key row decays by its own channel's gate);
u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T. g is the per-channel log decay [B, T, H, K] (<= 0),
beta [B, T, H]; states [N, H, K, V]. It accumulates in fp32 (fp64 for fp64 inputs), and doubles as the CPU
decode path of fused_recurrent_kda (one step per token is all a decode step does).
"""
import torch

from kernels.common import compute_dtype, sequence_bounds


def naive_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k, g (log decay per channel) [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; states [N,H,K,V]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, beta, initial_state), v.dtype
    q, k, v, g, beta = q.to(dtype) * scale, k.to(dtype), v.to(dtype), g.to(dtype), beta.to(dtype)
    state = initial_state.to(dtype) if initial_state is not None else None
    if cu_seqlens is None:  # the rows are the sequences and run side by side
        o, final = _recurrence(q, k, v, g, beta, state)
    else:
        outputs, finals = [], []
        bounds = sequence_bounds(cu_seqlens, B, T)
        for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
            o_n, final_n = _recurrence(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos],
                                       beta[:, bos:eos], None if state is None else state[n:n + 1])
            outputs.append(o_n)
            finals.append(final_n)
        o, final = torch.cat(outputs, 1), torch.cat(finals, 0)
    return o.to(out_dtype), (final if output_final_state else None)


def _recurrence(q, k, v, g, beta, state):
    B, T, H, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    outputs = []
    for t in range(T):
        state = g[:, t].exp()[..., None] * state
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], state))
        state = state + k[:, t].unsqueeze(-1) * u.unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(v.shape)
    return o, state
