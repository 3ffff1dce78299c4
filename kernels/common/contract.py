"""The state contract's input checks and the PyTorch paths' numerics helpers."""
import torch


def check_recurrent_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> int:
    """Validate the shared part of the state contract; returns N, the number of sequences."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if cu_seqlens is None:
        N = B
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [N+1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (flattened sequences), got B={B}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, K, V] = [{N}, {H}, {K}, {v.shape[-1]}], "
                         f"got {tuple(initial_state.shape)}")
    return N


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (the tests' ground truth)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


NEGLIGIBLE_LOG_DECAY = -60.0  # below e^-60 a decayed term is dropped: far under fp32/fp64 rounding of O(1) terms


def decay_or_zero(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay), exactly 0 where it is below e^-60. Never a denormal number: x86 CPUs compute with
    denormals some 100x slower, and long sequences decay into them (e^-87 and below in fp32)."""
    kept = log_decay > NEGLIGIBLE_LOG_DECAY
    return torch.where(kept, torch.exp(log_decay.clamp(min=NEGLIGIBLE_LOG_DECAY)), 0.0)


def autograd_vjp(op, inputs: tuple[torch.Tensor, ...], do: torch.Tensor,
                 initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(*input gradients, d initial_state or None) of o = op(*inputs, initial_state) for the output gradient do,
    by autograd through op (the PyTorch paths' vector-Jacobian product: their forward runs again)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in inputs]
        state = None if initial_state is None else initial_state.detach().requires_grad_()
        o = op(*leaves, state)
    grads = torch.autograd.grad(o, leaves + ([] if state is None else [state]), do)
    return (*grads[:len(leaves)], None if state is None else grads[-1])
