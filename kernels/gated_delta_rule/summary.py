"""The gated delta rule's state summary of each sequence, in PyTorch (CPU and CUDA; backward by autograd).

The final state is affine in the initial one, S_final = M S_0 + S_local. With the WY factors of the chunk
kernel (chunk.py's wy_system, whose inverse T gives W and U there) each chunk maps the state S -> F_c S + s_c:
    F_c = exp(gamma_C) I - k_to_end W,    s_c = k_to_end U,
and a sequence's summary is their composition (kernels/common/chunk_maps.py). No outputs: nothing involving
q (no intra-chunk attention, no output from the states).
"""
import torch

from kernels.common import chunk_layout, compute_dtype, sequence_bounds
from kernels.common.chunk_maps import compose_chunk_maps
from kernels.gated_delta_rule.chunk import CHUNK_SIZE, wy_system


def gated_delta_rule_state_summary_torch(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = k.shape
    dtype = compute_dtype(k, v, g, beta)
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype)).transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0: an identity step.
    k, v, g, beta = (chunked(x) for x in (k, v, g, beta))
    gamma, _, system, k_to_end = wy_system(k, g, beta)
    # k_to_end T (T = system^-1) by one triangular solve for its K rows, rather than T itself and then
    # W = T diag(beta exp(gamma)) K and U = T diag(beta) V: F_c = exp(gamma_C) I - (k_to_end T) diag(..) K.
    k_to_end_T = torch.linalg.solve_triangular(system, k_to_end, upper=False, left=False, unitriangular=True)
    eye = torch.eye(K, dtype=dtype, device=k.device)
    chunk_maps = gamma[..., -1, None, None].exp() * eye - k_to_end_T @ (k * (beta * gamma.exp())[..., None])
    chunk_updates = k_to_end_T @ (v * beta[..., None])  # [chunks, H, K, V]
    return compose_chunk_maps(chunk_maps, chunk_updates, layout)
