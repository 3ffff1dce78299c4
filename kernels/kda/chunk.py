"""KDA in chunks of 64 tokens with the WY representation, in PyTorch (the CPU path; backward by autograd).

The gated delta rule's WY form (kernels/gated_delta_rule/chunk.py) with a decay per key channel. Within a
chunk, with gamma_t in R^K the cumulative log decay from the chunk start and S the state entering the chunk,
unrolling the recurrence gives u_t = beta_t (v_t - (k_t * exp(gamma_t))^T S - sum_{s<t} M_ts u_s) with
M_ts = sum_c k_tc k_sc exp(gamma_tc - gamma_sc), a unit lower-triangular system (I + diag(beta) M) u =
beta v - beta (K * exp(gamma)) S. With T = (I + diag(beta) M)^{-1} (the "UT transform"):

    W = T diag(beta) (K * exp(gamma)),   U = T diag(beta) V,   V_new = U - W S
    O = scale (Q * exp(gamma)) S + A V_new,   A_ts = scale sum_c q_tc k_sc exp(gamma_tc - gamma_sc), s <= t
    S_next = Diag(exp(gamma_C)) S + (K * exp(gamma_C - gamma))^T V_new

Every exponentiated term is <= 0, every decay factor <= 1: exp(gamma_t) and exp(gamma_C - gamma_t) are decays
from the chunk's start and to its end, and the pairwise M and A come from kernels/common/intra_chunk.py's
sub-chunk form (split at a token between t and s, never exp(gamma_t) exp(-gamma_s)). All intra-chunk work is
batched over every chunk of every sequence; only the state hand-off loops over chunk index.
"""
import torch
import torch.nn.functional as F

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds
from kernels.common.intra_chunk import intra_chunk_vector_attention


def chunk_kda_torch(
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
    """Chunked KDA; same contract as `kernels.kda.chunk_kda`. fp32 inside (fp64 for fp64)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype, out_dtype = compute_dtype(q, k, v, g, beta, initial_state), v.dtype
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, q.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        x = layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype))
        return x.transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0: it leaves the state unchanged.
    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    gamma, W, U, k_to_end = wy_factors(k, v, g, beta)
    q_decayed = q * (scale * gamma.exp())
    attention = intra_chunk_vector_attention(q * scale, k, g, gamma)

    # Inter-chunk: scan over chunk index, all sequences at once. Grid slots past a sequence's end are
    # identity steps (W = U = 0, decay 1), so each sequence's final state passes through them unchanged.
    k_to_end = layout.to_grid(k_to_end, 0.0)
    decay_to_end = layout.to_grid(gamma[..., -1, :, None].exp(), 1.0)  # [N, max_chunks, H, K, 1]
    W, U = layout.to_grid(W, 0.0), layout.to_grid(U, 0.0)
    state = initial_state.to(dtype) if initial_state is not None else q.new_zeros(layout.num_seqs, H, K, V)
    states_in, v_new = [], []
    # unbind, not [:, c]: each slice's backward would otherwise write a full-size zero gradient.
    for w_c, u_c, decay_c, k_c in zip(*(x.unbind(1) for x in (W, U, decay_to_end, k_to_end))):
        states_in.append(state)
        v_new.append(u_c - w_c @ state)
        state = decay_c * state + k_c @ v_new[-1]
    o = q.new_zeros(layout.num_chunks, H, CHUNK_SIZE, V)
    if states_in:
        states_in = layout.from_grid(torch.stack(states_in, 1))
        o = q_decayed @ states_in + attention @ layout.from_grid(torch.stack(v_new, 1))
    o = layout.from_chunks(o.transpose(1, 2)).view(B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def wy_factors(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """Per chunk (inputs [chunks, H, C, *D]): gamma [.., C, K], the WY factors W = T diag(beta) (K *
    exp(gamma)) [.., C, K] and U = T diag(beta) V [.., C, V] (T = (I + diag(beta) M)^{-1}), and
    k_to_end = (K * exp(gamma_C - gamma))^T [.., K, C]: a chunk maps its incoming state S to
    Diag(exp(gamma_C)) S + k_to_end (U - W S)."""
    C = k.shape[-2]
    gamma = g.cumsum(-2)
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    # M on the diagonal is k_t . k_t, which the system does not use: masked, not subtracted.
    system = torch.where(strictly_lower, beta[..., :, None] * intra_chunk_vector_attention(k, k, g, gamma), 0.0)
    system = system + torch.eye(C, dtype=k.dtype, device=k.device)
    # gamma_C - gamma_t = the gates after t, summed (a constant 0 for the last token, never x - x)
    to_end = F.pad(g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))
    W = torch.linalg.solve_triangular(system, k * gamma.exp() * beta[..., None], upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    return gamma, W, U, (k * to_end.exp()).transpose(-1, -2)
