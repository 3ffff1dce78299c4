"""Gated DeltaProduct as the plain recurrence, token by token and Householder step by step: the ground truth.

    S' = exp(g_t) S_{t-1};  for j = 1..n_h:  S' = (I - beta_tj k_tj k_tj^T) S' + beta_tj k_tj v_tj^T;
    S_t = S';  o_t = scale * S_t^T q_t

Written independently of the interleaved form the chunked op runs (kernels/gated_delta_product/__init__.py),
so the tests compare two different computations. fp32 inside (fp64 for fp64 inputs).
"""
import torch

from kernels.common import compute_dtype, sequence_bounds


def naive_gated_delta_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              beta: torch.Tensor, scale: float | None = None,
                              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                              cu_seqlens: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B,T,H,K]; k [B,T,n_h,H,K]; v [B,T,n_h,H,V]; g [B,T,H]; beta [B,T,n_h,H]; states [N,H,K,V]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, beta, initial_state), v.dtype
    # The flattened [B*T] token axis, cut into sequences: the rows, or cu_seqlens' documents.
    q, k, v, g, beta = (x.reshape(B * T, *x.shape[2:]).to(dtype) for x in (q, k, v, g, beta))
    bounds = sequence_bounds(cu_seqlens, B, T)
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        state = initial_state[n].to(dtype) if initial_state is not None else q.new_zeros(H, K, v.shape[-1])
        for t in range(bos, eos):
            state = g[t].exp()[:, None, None] * state
            for j in range(k.shape[1]):  # the token's Householder steps
                u = beta[t, j, :, None] * (v[t, j] - torch.einsum("hk,hkv->hv", k[t, j], state))
                state = state + k[t, j, :, :, None] * u[:, None, :]
            outputs.append(scale * torch.einsum("hk,hkv->hv", q[t], state))
        finals.append(state)
    o = torch.stack(outputs).view(B, T, H, -1) if outputs else v.new_zeros(B, T, H, v.shape[-1])
    return o.to(out_dtype), (torch.stack(finals) if output_final_state else None)
