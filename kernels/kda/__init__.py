"""Kimi Delta Attention (KDA): the gated delta rule with a decay per key channel.

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

g is the per-channel log decay [B, T, H, K] (<= 0) and beta the write strength [B, T, H] (in (0, 2), as for the
gated delta rule); the caller L2-normalises q and k. scale defaults to K^-0.5; states are [N, H, K, V] fp32,
the gated delta rule's conventions (kernels/gated_delta_rule). Entry points dispatch by device
(kernels/backend.py): CUDA -> Triton, otherwise chunked PyTorch. The Triton modules are imported on first
use, so CPU-only installs never need Triton and TRITON_INTERPRET=1 can be set any time before the first
Triton call.
"""
import torch

from kernels.backend import use_triton
from kernels.common import autograd_vjp, check_recurrent_inputs
from kernels.kda.chunk import chunk_kda_torch
from kernels.kda.naive import naive_kda
from kernels.kda.summary import kda_state_summary_torch


def _check_gates(q: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    if g.shape != q.shape:
        raise ValueError(f"g must be [B, T, H, K] = {list(q.shape)} (a decay per key channel), got {tuple(g.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {list(q.shape[:3])}, got {tuple(beta.shape)}")


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise KDA for training and prefill. q, k, g [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; states
    [N,H,K,V] fp32. Returns (o [B,T,H,V] in v's dtype, final state or None)."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gates(q, g, beta)
    if use_triton(q):
        from kernels.kda.triton_chunk import chunk_kda_triton
        return chunk_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_kda_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def chunk_kda_vjp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  do: torch.Tensor, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None) -> tuple:
    """chunk_kda's input gradients (dq, dk, dv, [dg, dbeta], d initial_state or None) for the output gradient
    do, without a final state: the Triton op runs only its backward; the chunked PyTorch path recomputes under
    autograd. For recomputation around the scan (model/recurrent.py)."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gates(q, g, beta)
    if use_triton(q):
        from kernels.kda.triton_chunk import chunk_kda_triton_vjp
        return chunk_kda_triton_vjp(q, k, v, g, beta, do, scale, cu_seqlens, initial_state)
    dq, dk, dv, dg, dbeta, d_initial = autograd_vjp(
        lambda q, k, v, g, beta, h0: chunk_kda_torch(q, k, v, g, beta, scale, h0, False, cu_seqlens)[0],
        (q, k, v, g, beta), do, initial_state)
    return dq, dk, dv, [dg, dbeta], d_initial


def fused_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step KDA for decoding and short inputs; same contract as chunk_kda."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gates(q, g, beta)
    if use_triton(q):
        from kernels.kda.fused_recurrent import fused_recurrent_kda_triton
        return fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return naive_kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def kda_state_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_kda's state-only pass (no outputs), for sequence parallelism: per sequence the final state from a
    zero start, S_local [N,H,K,V] fp32, and the transition M [N,H,K,K]: the op's final state from S_0 is
    M @ S_0 + S_local (the default combine of parallel/sequence.py, as for the gated delta rule). PyTorch on
    every device (backward by autograd): the chunk-state recurrence alone, on the WY factors."""
    check_recurrent_inputs(k, k, v, None, cu_seqlens)
    _check_gates(k, g, beta)
    return kda_state_summary_torch(k, v, g, beta, cu_seqlens)


__all__ = ["chunk_kda", "chunk_kda_vjp", "fused_recurrent_kda", "kda_state_summary", "naive_kda", "chunk_kda_torch"]
