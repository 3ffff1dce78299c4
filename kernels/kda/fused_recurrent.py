"""KDA one token at a time in Triton: the decode path (T = 1 with a cached state) and short inputs. On other
devices the step-by-step loop is naive.py's (a decode step is exactly one of its steps).

Each program keeps a [K, BV] slice of one sequence's state for one head in registers and walks the tokens:
S <- exp(g)[:, None] S (a decay per key row);  u = beta (v - S^T k);  S <- S + k u^T;  o = scale S^T q.
The backward reuses the chunkwise backward kernels (triton_chunk.py): a step-by-step backward would need
every intermediate state, which the chunked form recomputes cheaply instead.
"""
import torch
import triton
import triton.language as tl

from kernels.common.chunks import ChunkIndex
from kernels.common.state_passes import check_key_dim
from kernels.kda.triton_chunk import kda_op
from kernels.tuning import autotune


@autotune([triton.Config({"BV": 64}, num_warps=4), triton.Config({"BV": 32}, num_warps=2),
           triton.Config({"BV": 16}, num_warps=1)],
          key=["H", "K", "V", "USE_INITIAL_STATE", "STORE_FINAL_STATE"])
@triton.jit
def _fused_recurrent_kernel(
    q, k, v, g, beta, o, initial_state, final_state, scale, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = o_k < K, o_v < V
    state_offsets = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(initial_state + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
        b_h *= tl.exp(b_g)[:, None]
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)
    if STORE_FINAL_STATE:
        tl.store(final_state + state_offsets, b_h, mask=state_mask)


def fused_recurrent_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks: ChunkIndex):
    """(o, final state or None), one token at a time."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = chunks.num_sequences
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    final_state = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)  # noqa: E731
    _fused_recurrent_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), o,
        initial_state, final_state, scale, chunks.cu_seqlens,
        H=H, K=K, V=V, BK=triton.next_power_of_2(K), USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
    )
    return o, final_state


def _decode_forward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, output_final_state):
    initial_state = initial_state.contiguous() if initial_state is not None else None
    return fused_recurrent_kda_fwd(q, k, v, *gates, scale, initial_state, output_final_state, chunks)


kda_op.decode_forward = _decode_forward


def fused_recurrent_kda_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step Triton KDA; same contract as `kernels.kda.fused_recurrent_kda`."""
    check_key_dim(k.shape[-1])  # for the chunk kernels of the backward
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return kda_op(q, k, v, [g, beta], initial_state, cu_seqlens, scale, output_final_state, True)
