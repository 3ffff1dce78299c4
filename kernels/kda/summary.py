"""KDA's state summary of each sequence, in PyTorch (CPU and CUDA; backward by autograd).

The final state is affine in the initial one, S_final = M S_0 + S_local. With the WY factors of the chunked
path (chunk.py's wy_factors) each chunk maps the state S -> F_c S + s_c:
    F_c = Diag(exp(gamma_C)) - k_to_end W,    s_c = k_to_end U,
and a sequence's summary is their composition (kernels/common/chunk_maps.py), as for the gated delta rule.
No outputs: nothing involving q (no intra-chunk attention, no output from the states).
"""
import torch

from kernels.common import CHUNK_SIZE, chunk_layout, compute_dtype, sequence_bounds
from kernels.common.chunk_maps import compose_chunk_maps
from kernels.kda.chunk import wy_factors


def kda_state_summary_torch(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = k.shape
    dtype = compute_dtype(k, v, g, beta)
    layout = chunk_layout(sequence_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *D] -> [chunks, H, C, *D] in the compute dtype
        return layout.to_chunks(x.reshape(B * T, *x.shape[2:]).to(dtype)).transpose(1, 2)

    # Padding after a sequence's end has k = v = beta = g = 0: an identity step.
    k, v, g, beta = (chunked(x) for x in (k, v, g, beta))
    gamma, W, U, k_to_end = wy_factors(k, v, g, beta)
    chunk_maps = torch.diag_embed(gamma[..., -1, :].exp()) - k_to_end @ W  # [chunks, H, K, K]
    chunk_updates = k_to_end @ U  # [chunks, H, K, V]
    return compose_chunk_maps(chunk_maps, chunk_updates, layout)
