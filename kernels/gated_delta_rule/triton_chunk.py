"""Chunkwise gated delta rule in Triton: forward and backward, chunk size 64 (the math is in chunk.py).

Composed of the shared stages (kernels/common) and the delta rule's own WY kernels (triton_wy.py):
  forward   WY factors (W, U, gamma) -> state pass (V_new = U - W S, the states) -> output pass
  backward  WY factors and states recomputed (never kept from the forward) -> state backward (dS per chunk,
            dV_new) -> intra-chunk backward (dq, dv; dT; dA; dk, dbeta, dg)
Every call is variable-length internally (ChunkIndex): a [B, T] batch is B sequences of T tokens over the
flattened tokens. Each sequence starts a fresh chunk; loads past a sequence's end read zeros (k = v = beta =
g = 0), which leave the state unchanged. Exponents are only ever of differences gamma_i - gamma_j with j <= i
(or masked before exp): no overflow for any gate.
`python -m bench.gpu_compile` compiles the kernels for sm_80/90/100 without a GPU and reports registers,
spills and shared memory.
"""
import torch

from kernels.common.chunks import CHUNK_SIZE, ChunkIndex
from kernels.common.custom_ops import RecurrentOp
from kernels.common.output_pass import chunk_outputs
from kernels.common.state_passes import block_size, check_key_dim, chunk_state_grads, chunk_states, dot_precision
from kernels.gated_delta_rule.triton_wy import (_intra_bwd_dk_kernel, _intra_bwd_k_kernel, _intra_bwd_v_kernel,
                                                _intra_bwd_wy_kernel, _wy_kernel)


def _wy(k, v, g, beta, chunks: ChunkIndex, store_t: bool):
    """(gamma, W, U, T or None) of every chunk, fp32, over [tokens, H, ...] inputs."""
    TT, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    g_cumsum = torch.empty(TT, H, **f32)
    w = torch.empty(TT, H, K, **f32)
    u = torch.empty(TT, H, V, **f32)
    t_inv = torch.empty(TT, H, CHUNK_SIZE, **f32) if store_t else None
    if chunks.num_chunks:
        _wy_kernel[(chunks.num_chunks, H)](
            k, v, g, beta, g_cumsum, w, u, t_inv, chunks.cu_seqlens, chunks.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K), STORE_T=store_t, DOT_PRECISION=dot_precision(k),
        )
    return g_cumsum, w, u, t_inv


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks: ChunkIndex):
    """Forward on [B, T, ...] inputs; returns (o, final_state or None)."""
    B, T, H, V = v.shape
    q, k, v, g, beta = _flatten(q, k, v, g, beta)
    g_cumsum, w, u, _ = _wy(k, v, g, beta, chunks, store_t=False)
    h, v_new, final_state = chunk_states(k, u, g_cumsum, chunks, initial_state, output_final_state, w=w)
    o = chunk_outputs(q, k, v_new, g_cumsum, h, scale, chunks, out_dtype=v.dtype)
    return o.view(B, T, H, V), final_state


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, chunks: ChunkIndex, do, d_final_state):
    """Gradients (dq, dk, dv, dg, dbeta, d_initial_state or None) of the op at these inputs, recomputing the
    chunk states from the inputs. d_final_state may be None (no gradient flows into the final state)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    precision = dot_precision(q)
    q, k, v, g, beta, do = _flatten(q, k, v, g, beta, do)
    g_cumsum, w, u, t_inv = _wy(k, v, g, beta, chunks, store_t=True)
    h, v_new, _ = chunk_states(k, u, g_cumsum, chunks, initial_state, False, w=w)
    dh, dv_new, d_h0 = chunk_state_grads(q, k, g_cumsum, do, scale, chunks, d_final_state, initial_state, w=w)
    dq, dk, dv, dbeta, dg = (torch.empty_like(x) for x in (q, k, v, beta, g))
    if chunks.num_chunks:
        f32 = dict(dtype=torch.float32, device=k.device)
        dqk, dt_u, dt, da = (torch.empty(k.shape[0], H, CHUNK_SIZE, **f32) for _ in range(4))
        dbeta_v, dgamma_k, dbeta_part, dgamma_part = (torch.empty(k.shape[0], H, **f32) for _ in range(4))
        grid, index = (chunks.num_chunks, H), (chunks.cu_seqlens, chunks.chunk_indices)
        shapes = dict(H=H, BT=CHUNK_SIZE, DOT_PRECISION=precision)
        keys = dict(K=K, BK=block_size(K, most=32))
        _intra_bwd_v_kernel[grid](v, beta, g_cumsum, t_inv, v_new, dv_new, do, dv, dqk, dt_u, dbeta_v, scale,
                                  *index, V=V, **shapes)
        _intra_bwd_k_kernel[grid](q, k, beta, g_cumsum, h, dv_new, do, dq, dqk, dt_u, dt, dgamma_k, scale, *index,
                                  V=V, **keys, **shapes)
        _intra_bwd_wy_kernel[grid](k, beta, g_cumsum, t_inv, dt, da, dbeta_v, dgamma_k, dbeta_part, dgamma_part,
                                   *index, **keys, **shapes)
        _intra_bwd_dk_kernel[grid](q, k, beta, g_cumsum, t_inv, h, dh, v_new, dv_new, dqk, da, dbeta_part,
                                   dgamma_part, dk, dbeta, dg, *index, V=V, **keys, **shapes)
    if d_h0 is not None:
        d_h0 = d_h0.to(initial_state.dtype)
    return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), dg.view(B, T, H),
            dbeta.view(B, T, H), d_h0)


def _flatten(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, H, ...] -> contiguous [B*T, H, ...]: the kernels index tokens of the flattened batch."""
    return [x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous() for x in xs]


def _forward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, output_final_state):
    g, beta = gates
    initial_state = initial_state.contiguous() if initial_state is not None else None
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunks)


def _backward(q, k, v, gates, initial_state, chunks: ChunkIndex, scale, do, d_final_state):
    g, beta = gates
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if d_final_state is not None:
        d_final_state = d_final_state.contiguous()
    dq, dk, dv, dg, dbeta, d_h0 = chunk_gated_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, chunks, do,
                                                             d_final_state)
    return dq, dk, dv, [dg, dbeta], d_h0


gated_delta_rule_op = RecurrentOp("gated_delta_rule", _forward, _backward)  # decode: fused_recurrent.py


def chunk_gated_delta_rule_triton(
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
    """Triton chunkwise gated delta rule; same contract as `kernels.chunk_gated_delta_rule`."""
    check_key_dim(k.shape[-1])
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return gated_delta_rule_op(q, k, v, [g, beta], initial_state, cu_seqlens, scale, output_final_state, False)


def chunk_gated_delta_rule_triton_vjp(q, k, v, g, beta, do, scale=None, cu_seqlens=None, initial_state=None):
    """The op's backward alone; same contract as `kernels.chunk_gated_delta_rule_vjp`."""
    check_key_dim(k.shape[-1])
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return gated_delta_rule_op.vjp(q, k, v, [g, beta], cu_seqlens, scale, do, initial_state)
