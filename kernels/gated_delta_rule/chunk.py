"""The gated delta rule in chunks of 64 tokens with the WY representation, in PyTorch (the CPU path).

Within a chunk, with gamma the cumulative log gate from the chunk start and S the state entering the chunk,
unrolling the recurrence gives u_t = beta_t (v_t - exp(gamma_t) S^T k_t - sum_{s<t} exp(gamma_t - gamma_s)
(k_t . k_s) u_s), a unit lower-triangular system (I + A) u = beta v - beta exp(gamma) K S. With
T = (I + A)^{-1} (the "UT transform") the chunk's delta-rule updates become two matmuls:

    W = T diag(beta exp(gamma)) K,   U = T diag(beta) V,   V_new = U - W S
    O = scale (diag(exp(gamma)) Q S + (Q K^T * decay, causal) V_new)
    S_next = exp(gamma_C) S + (diag(exp(gamma_C - gamma)) K)^T V_new

All intra-chunk work is batched over every chunk of every sequence; only the state hand-off loops over chunk
index. Exponents are differences gamma_t - gamma_s with s <= t (masked before exp), so they never overflow.
The backward is autograd's.
"""
import torch
import torch.nn.functional as F

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds



def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule; same contract as `kernels.chunk_gated_delta_rule`. fp32 inside (fp64 for fp64)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = CHUNK_SIZE
    scale = K**-0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, beta, initial_state), v.dtype
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), C, q.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        x = layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype))
        return x.transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0: it leaves the state unchanged.
    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    gamma, decay, W, U, k_to_end = wy_factors(k, v, g, beta)
    q_decayed = q * (scale * gamma.exp())[..., None]
    qk = (q @ k.transpose(-1, -2)) * decay * scale

    # Inter-chunk: scan over chunk index, all sequences at once. Grid slots past a sequence's end are
    # identity steps (W = U = 0, decay 1), so each sequence's final state passes through them unchanged.
    k_to_end = layout.to_grid(k_to_end, 0.0)
    decay_to_end = layout.to_grid(gamma[..., -1].exp()[..., None, None], 1.0)
    W, U = layout.to_grid(W, 0.0), layout.to_grid(U, 0.0)
    state = initial_state.to(dtype) if initial_state is not None else q.new_zeros(layout.num_seqs, H, K, V)
    states_in, v_new = [], []
    # unbind, not [:, c]: each slice's backward would otherwise write a full-size zero gradient.
    for w_c, u_c, decay_c, k_c in zip(*(x.unbind(1) for x in (W, U, decay_to_end, k_to_end))):
        states_in.append(state)
        v_new.append(u_c - w_c @ state)
        state = decay_c * state + k_c @ v_new[-1]
    o = q.new_zeros(layout.num_chunks, H, C, V)
    if states_in:
        states_in = layout.from_grid(torch.stack(states_in, 1))
        o = q_decayed @ states_in + qk @ layout.from_grid(torch.stack(v_new, 1))
    o = layout.from_chunks(o.transpose(1, 2)).view(B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def wy_factors(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """Per chunk (inputs [chunks, H, C, *D]): wy_system's gamma, decay and k_to_end, and the WY factors
    W = T diag(beta exp(gamma)) K [.., C, K] and U = T diag(beta) V [.., C, V] (T the system's inverse), so
    that a chunk maps its incoming state S to exp(gamma_C) S + k_to_end (U - W S)."""
    gamma, decay, system, k_to_end = wy_system(k, g, beta)
    eye = torch.eye(k.shape[-2], dtype=k.dtype, device=k.device)
    T_inv = torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)
    W = T_inv @ (k * (beta * gamma.exp())[..., None])
    U = T_inv @ (v * beta[..., None])
    return gamma, decay, W, U, k_to_end


def wy_system(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """Per chunk (inputs [chunks, H, C, *D]): gamma [chunks, H, C], the causal decay exp(gamma_t - gamma_s)
    [.., C, C], the unit lower-triangular system I + A of the UT transform [.., C, C], and
    k_to_end = (diag(exp(gamma_C - gamma)) K)^T [.., K, C]."""
    C = k.shape[-2]
    gamma = g.cumsum(-1)
    # The diagonal of the decay (exp(0)) and the last token's decay to the chunk end are constants, not
    # functions of gamma: written as exp(gamma_t - gamma_t) their gate gradients would be O(1) terms that
    # cancel only up to rounding, swamping dg when the gates are tiny (g of -20 and below).
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    decay = torch.where(strictly_lower, gamma[..., :, None] - gamma[..., None, :], float("-inf")).exp() + eye
    to_end = F.pad(g.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # gamma_C - gamma_t = sum_{s>t} g_s
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay * strictly_lower
    return gamma, decay, eye + A, (k * to_end.exp()[..., None]).transpose(-1, -2)
