"""RMSNorm computed in fp32 with an optional SiLU gate (before or after the norm), forward only: the callers
(model/layers.py) hold the backward. CUDA tensors take the Triton kernel (triton_norm.py, one launch), others
the PyTorch formula (naive.py), both behind one custom op, so torch.compile treats the norm as one opaque call.
"""
import torch

from kernels.backend import use_triton
from kernels.norm.naive import naive_rms_norm


def _forward_op(x, weight, gate, eps, out_dtype, norm_before_gate):
    if use_triton(x):
        from kernels.norm.triton_norm import rms_norm_triton
        return rms_norm_triton(x, weight.contiguous(), gate, eps, out_dtype, norm_before_gate)
    y, rstd = naive_rms_norm(x, weight, eps, gate, norm_before_gate)
    return y.to(out_dtype), rstd.view(-1)


_norm = torch.library.custom_op(
    "baton::rms_norm", _forward_op, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? gate, float eps, ScalarType out_dtype, bool norm_before_gate) "
           "-> (Tensor, Tensor)")


@_norm.register_fake
def _(x, weight, gate, eps, out_dtype, norm_before_gate):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[0], dtype=torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
             gate: torch.Tensor | None = None, norm_before_gate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D], weight [D], gate None or like x -> (y [..., D] in out_dtype, rstd [..., 1] fp32), computed in
    fp32 as naive_rms_norm. Forward only (no autograd): model/layers.py's norms wrap it with their backwards."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    rows = lambda t: t.reshape(-1, D).contiguous()  # noqa: E731
    y, rstd = _norm(rows(x), weight, None if gate is None else rows(gate), float(eps), out_dtype, norm_before_gate)
    return y.view(x.shape), rstd.view(*x.shape[:-1], 1)


__all__ = ["naive_rms_norm", "rms_norm"]
