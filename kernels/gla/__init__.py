"""Gated linear attention (vector gate: GLA; scalar gate per head: Mamba2, RetNet).

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

Entry points dispatch by device (kernels/backend.py): CUDA -> Triton, otherwise chunked PyTorch.
The Triton modules are imported on first use, so CPU-only installs never need Triton and the
interpreter switch (TRITON_INTERPRET=1) can be set any time before the first Triton call.
"""
import torch

from kernels.backend import use_triton
from kernels.common import autograd_vjp, check_recurrent_inputs
from kernels.gla.chunk import chunk_gla_torch
from kernels.gla.naive import naive_recurrent_gla
from kernels.gla.summary import gla_state_summary_torch


def _check_gate(q: torch.Tensor, g: torch.Tensor) -> None:
    if g.shape != q.shape and g.shape != q.shape[:3]:
        raise ValueError(f"g must be [B, T, H, K] (vector gate) or [B, T, H] (scalar gate) for q of shape "
                         f"{tuple(q.shape)}, got {tuple(g.shape)}")


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA for training and prefill. q, k [B,T,H,K]; v [B,T,H,V]; g log gate [B,T,H,K] or
    [B,T,H]; states [N,H,K,V] fp32. Returns (o [B,T,H,V] in v's dtype, final state or None)."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gate(q, g)
    if use_triton(q):
        from kernels.gla.triton_chunk import chunk_gla_triton
        return chunk_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gla_vjp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, do: torch.Tensor,
                  scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None) -> tuple:
    """chunk_gla's input gradients (dq, dk, dv, [dg], d initial_state or None) for the output gradient do, without
    a final state: the Triton op runs only its backward (not its forward again); the chunked PyTorch path
    recomputes under autograd. For recomputation around the scan (model/recurrent.py; an initial state under
    sequence parallelism)."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gate(q, g)
    if use_triton(q):
        from kernels.gla.triton_chunk import chunk_gla_triton_vjp
        return chunk_gla_triton_vjp(q, k, v, g, do, scale, cu_seqlens, initial_state)
    dq, dk, dv, dg, d_initial = autograd_vjp(
        lambda q, k, v, g, h0: chunk_gla_torch(q, k, v, g, scale, h0, False, cu_seqlens)[0], (q, k, v, g), do,
        initial_state)
    return dq, dk, dv, [dg], d_initial


def fused_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step GLA for decoding and short inputs; same contract as chunk_gla."""
    check_recurrent_inputs(q, k, v, initial_state, cu_seqlens)
    _check_gate(q, g)
    if use_triton(q):
        from kernels.gla.fused_recurrent import fused_recurrent_gla_triton
        return fused_recurrent_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def gla_state_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gla's state-only pass (no outputs), for sequence parallelism: per sequence the final state from a
    zero start, S_local [N,H,K,V] fp32, and the diagonal transition a, [N,H,K] (vector gate) or [N,H]
    (scalar gate): chunk_gla's final state from S_0 is a[..., None] * S_0 + S_local (a[..., None, None]
    for a scalar gate). PyTorch on every device (backward by autograd): one T x K x V contraction."""
    check_recurrent_inputs(k, k, v, None, cu_seqlens)
    _check_gate(k, g)
    return gla_state_summary_torch(k, v, g, cu_seqlens)


__all__ = ["chunk_gla", "chunk_gla_vjp", "fused_recurrent_gla", "gla_state_summary", "naive_recurrent_gla",
           "chunk_gla_torch"]
