"""Token-local building blocks of the exported Baton model, in plain PyTorch (no Baton, no Triton): the norms,
the SwiGLU MLP, the short causal convolution, rotary embeddings and L2 normalisation, each computing what Baton's
layer computes (model/layers.py, model/recurrent.py, kernels/norm and kernels/conv naive paths) in the same precision.

THE MIXER INTERFACE every exported token mixer (baton_linear_attention.py, baton_delta_rule.py, baton_rnn.py,
baton_liger.py, modeling_baton.py's attention) follows:

    class <Mixer>(nn.Module):
        def __init__(self, config: BatonConfig)          # (config, letter) where one class serves several letters
        def forward(self, x, state: dict | None) -> (y, state)

x and y are [B, T, d_model]. `state=None` is an empty history; the returned dict holds everything needed to
continue (recurrent state, conv windows, KV cache or window of keys), so a forward over a prompt followed by
forwards of one token each gives the outputs of one forward over the whole sequence. Parameter and submodule
names are exactly those of Baton's module for that mixer, so Baton's model.safetensors loads unchanged.
Recurrences run as plain loops over time in fp32, as Baton's reference kernels (kernels/*/naive.py) do.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: Optional[torch.Tensor] = None,
             norm_before_gate: bool = True) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in fp32 (a bf16 mean of squares loses too much), times silu(gate)
    after the norm (norm_before_gate) or with x * silu(gate) normed in x's place; returned in x's dtype."""
    x32 = x.float()
    if gate is not None and not norm_before_gate:
        x32 = x32 * F.silu(gate.float())
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None and norm_before_gate:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm with a SiLU gate: norm(x) * silu(z) (GLA, the delta rule, mLSTM) or norm(x * silu(z)) (Mamba2,
    norm_before_gate=False)."""

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = True):
        super().__init__(dim, eps)
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gate, self.norm_before_gate)


class SwiGLU(nn.Module):
    """The block's MLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time, kernel size W: y_t = act(bias + sum_i weight[:, i] x_{t-W+1+i}),
    computed in fp32. Its state is the window of the last W-1 inputs [B, D, W-1] (zeros before the first token),
    passed in and returned so a prompt and then single tokens convolve as the whole sequence would."""

    def __init__(self, dim: int, kernel_size: int, bias: bool = False, activation: Optional[str] = "silu"):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.zeros(dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, window: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] after the window [B, D, W-1] (None: zeros) -> (y [B, T, D] in x's dtype, the new window)."""
        B, T, D = x.shape
        W = self.weight.shape[1]
        if window is None:
            window = x.new_zeros(B, D, W - 1)
        inputs = torch.cat([window.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, D, W-1+T]
        bias = None if self.bias is None else self.bias.float()
        y = F.conv1d(inputs.float(), self.weight.float()[:, None, :], bias, groups=D).transpose(1, 2)
        if self.activation == "silu":
            y = F.silu(y)
        return y.to(x.dtype), inputs[:, :, inputs.shape[2] - (W - 1):]


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict], device: torch.device) -> torch.Tensor:
    """The rotary frequencies [head_dim // 2] fp32, theta^(-2i/D) as Baton computes them (model/layers.py); with
    `scaling` (Llama 3's long-context rule: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) the long wavelengths divided by factor, the short ones kept and a smooth
    ramp between, as transformers' _compute_llama3_parameters does."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    if scaling is None:
        return inv_freq
    context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    ramped = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > context / low, inv_freq / factor, torch.where(wavelen < context / high, inv_freq,
                                                                                ramped))


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by its positions [T] in fp32, the two halves of each head as the pairs (Baton's
    half-split layout, also Llama's)."""
    half = x.shape[-1] // 2
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim in fp32 (F.normalize, as the delta-rule mixers normalise q and k)."""
    return F.normalize(x.float(), dim=-1)
