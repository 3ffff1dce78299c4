"""Token-local building blocks shared by every block: norms, the SwiGLU MLP, rotary embeddings."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.norm import naive_rms_norm, rms_norm


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class _RecomputedRMSNorm(torch.autograd.Function):
    """The gated norm (kernels.rms_norm: one kernel on CUDA) keeping only its inputs for the backward, which
    recomputes the fp32 intermediates with the PyTorch formula (cheap elementwise work) instead of holding four
    or five fp32 copies of the activations per token."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps: float, norm_before_gate: bool, out_dtype: torch.dtype):
        ctx.eps, ctx.norm_before_gate = eps, norm_before_gate
        ctx.save_for_backward(x, gate, weight)
        return rms_norm(x, weight, eps, out_dtype, gate, norm_before_gate)[0]

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, weight = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(needs) if t is not None else None
                  for t, needs in zip((x, gate, weight), ctx.needs_input_grad)]
        with torch.enable_grad():
            x, gate, weight = inputs
            y, _ = naive_rms_norm(x, weight, ctx.eps, gate, ctx.norm_before_gate)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_out))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None, None, None)


class _RMSNormFromOutput(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight in fp32 (kernels.rms_norm: one kernel on CUDA), returned in
    out_dtype, keeping for the backward its output (which the projections that read it keep anyway: no bytes of
    its own) and rstd (4 bytes per token), not its fp32 input: the normalised x is recovered as output / weight
    (as Apex's and Megatron's memory-efficient norms do), exact in fp32 and to bf16 rounding under autocast, the
    precision the matmuls after it use. Norm weights start at 1 and are not decayed; a weight of exactly 0 would lose its channel's gradient."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        y, rstd = rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(y, weight, rstd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, rstd = ctx.saved_tensors
        w32 = weight.float()
        normed = y.float() / w32
        grad_normed = grad_out.float() * w32
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = (grad_out.float() * normed).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(ctx.x_dtype), None if grad_weight is None else grad_weight.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 mean-of-squares loses too much), returned in the compute dtype: the
    autocast dtype under autocast (cast once here, so the projections reading it share one bf16 copy), else
    the input's. Keeps only its output for the backward (_RMSNormFromOutput)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """weight: the scale as a caller that recomputes this norm holds it (model/recurrent.py mix), else its own."""
        weight = self.weight if weight is None else weight
        return _RMSNormFromOutput.apply(x, weight, self.eps, compute_dtype(x))


class GatedRMSNorm(RMSNorm):
    """RMSNorm with a SiLU gate: norm(x) * silu(z) (GLA, Gated DeltaNet) or norm(x * silu(z)) (Mamba2).
    Keeps x and z (bf16 under autocast) for the backward, nothing in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = True):
        super().__init__(dim, eps)
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        return _RecomputedRMSNorm.apply(x, gate, weight, self.eps, self.norm_before_gate, compute_dtype(x))


class _SiluGatedLinear(torch.autograd.Function):
    """(silu(gate) * up) @ weight.T keeping gate and up but not their product: the backward recomputes it
    (elementwise) for the weight's gradient, where plain autograd would also keep silu(gate) and the product."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight.to(gate.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
        with torch.enable_grad():
            hidden = F.silu(gate) * up
        grad_weight = grad_out.flatten(0, -2).T @ hidden.detach().flatten(0, -2)
        grad_gate, grad_up = torch.autograd.grad(hidden, (gate, up), grad_out @ weight.to(grad_out.dtype))
        return grad_gate, grad_up, grad_weight.to(weight.dtype)


class SiluGatedLinear(nn.Linear):
    """SwiGLU's down projection applied to silu(gate) * up, fused (_SiluGatedLinear). A Linear of its own, so
    engines that gather a module's weights around its forward (DeepSpeed ZeRO-3) see it used."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(gate)
        with torch.autocast(gate.device.type, enabled=False):
            return _SiluGatedLinear.apply(gate.to(dtype), up.to(dtype), self.weight)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = SiluGatedLinear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x), self.up_proj(x))


def rope_frequencies(head_dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """The rotary frequencies [head_dim // 2] fp32: theta^(-2i/D), and with `scaling` (model.attention.
    rope_scaling, Llama 3's long-context rule) the long wavelengths divided by scaling.factor, the short ones
    kept and a smooth ramp between, exactly as Llama 3 checkpoints were trained with them."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    ramped = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return torch.where(wavelen > low_wavelen, inv_freq / scaling.factor,
                       torch.where(wavelen < high_wavelen, inv_freq, ramped))


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by its positions [T] (absolute row positions; only differences matter) at the
    frequencies inv_freq [D // 2] (rope_frequencies).

    The angles are computed on the fly in fp32 from the positions, so there is no buffer to shard,
    move or initialise, and sequence-parallel ranks rotate by their global positions for free.
    """
    half = x.shape[-1] // 2
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
