"""RMSNorm with an optional SiLU gate, in plain PyTorch in fp32: the ground truth, the CPU path, and the formula
model/layers.py differentiates when it recomputes a gated norm in the backward."""
import torch
import torch.nn.functional as F


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
                   norm_before_gate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) in fp32: y = x * rstd * weight, rstd = rsqrt(mean(x^2) + eps) [..., 1], times silu(gate) after
    (norm_before_gate) or with x * silu(gate) normed in place of x (before)."""
    x32 = x.float()
    if gate is not None and not norm_before_gate:
        x32 = x32 * F.silu(gate.float())
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = x32 * rstd * weight.float()
    if gate is not None and norm_before_gate:
        y = y * F.silu(gate.float())
    return y, rstd
