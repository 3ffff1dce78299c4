"""The norms and SwiGLU keep less for the backward (their inputs, recomputing elementwise work) and give the
same outputs and gradients as plain autograd over the same formulas: to 1e-5 in fp32, and under bf16
autocast their output is the compute dtype, shared by every projection that reads it."""
import pytest
import torch
import torch.nn.functional as F

from model.layers import GatedRMSNorm, RMSNorm, SwiGLU
from model.memory import saved_bytes


def plain_rms_norm(x, weight, eps, gate=None, norm_before_gate=True):
    x32 = x.float()
    if gate is not None and not norm_before_gate:
        x32 = x32 * F.silu(gate.float())
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y * F.silu(gate.float()) if gate is not None and norm_before_gate else y


def grads_of(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out.detach()] + [t.grad for t in inputs]


def assert_all_close(actual, expected, tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("gated, norm_before_gate", [(False, True), (True, True), (True, False)])
def test_norms_match_plain_autograd_in_fp32(gated, norm_before_gate):
    gen = torch.Generator().manual_seed(0)
    x, gate = torch.randn(2, 9, 16, generator=gen), torch.randn(2, 9, 16, generator=gen)
    norm = GatedRMSNorm(16, norm_before_gate=norm_before_gate) if gated else RMSNorm(16)
    weight = torch.rand(16, generator=gen) + 0.5
    if gated:
        expected = grads_of(lambda x, g, w: plain_rms_norm(x, w, 1e-5, g, norm_before_gate), x, gate, weight)
        actual = grads_of(lambda x, g, w: torch.func.functional_call(norm, {"weight": w}, (x, g)), x, gate, weight)
    else:
        expected = grads_of(lambda x, w: plain_rms_norm(x, w, 1e-5), x, weight)
        actual = grads_of(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), x, weight)
    assert_all_close(actual, expected, 1e-5)


def test_swiglu_matches_plain_autograd_in_fp32():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 40)
    x = torch.randn(3, 7, 16)
    params = dict(mlp.named_parameters())

    def plain(x, gate_w, up_w, down_w):
        return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)

    def fused(x, gate_w, up_w, down_w):
        weights = {"gate_proj.weight": gate_w, "up_proj.weight": up_w, "down_proj.weight": down_w}
        return torch.func.functional_call(mlp, weights, (x,))

    weights = [params[f"{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj")]
    assert_all_close(grads_of(fused, x, *weights), grads_of(plain, x, *weights), 1e-5)


def test_under_bf16_autocast_outputs_are_bf16_and_close_to_plain():
    torch.manual_seed(0)
    norm, mlp = RMSNorm(64), SwiGLU(64, 128)
    x = torch.randn(2, 32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = norm(x)
        out = mlp(normed)
        plain = F.linear(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed), mlp.down_proj.weight)
    assert normed.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(normed.float(), plain_rms_norm(x, norm.weight, 1e-5), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the same bf16 ops in the same order


def test_rms_norm_gradients_under_autocast_are_plain_ones_to_bf16_rounding():
    """The backward recovers the normalised x from the bf16 output: gradients to bf16 precision."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 32, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    expected = grads_of(lambda x, w: plain_rms_norm(x, w, 1e-5), x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = grads_of(lambda x, w: torch.func.functional_call(RMSNorm(64), {"weight": w}, (x,)), x, weight)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_saved_bytes_are_the_inputs_only():
    """RMSNorm keeps its bf16 output (2 bytes per channel per token) and rstd (4 per token), and with the
    projection that reads it nothing more; GatedRMSNorm its two bf16 inputs (2 + 2), SwiGLU its bf16 input and
    the two bf16 projections (2 x d_model + 2 x 2 x hidden)."""
    tokens, d, hidden = 256, 64, 160
    x = torch.randn(1, tokens, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert saved_bytes(RMSNorm(d), x) == 2 * d * tokens + 4 * tokens  # not the fp32 x
        projected = torch.nn.Sequential(RMSNorm(d), torch.nn.Linear(d, 3 * d, bias=False).to(torch.bfloat16))
        assert saved_bytes(projected, x) == 2 * d * tokens + 4 * tokens
        o, gate = (torch.randn(1, tokens, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        assert saved_bytes(GatedRMSNorm(d), o, gate) == 2 * 2 * d * tokens
        mlp = SwiGLU(d, hidden).to(torch.bfloat16)  # bf16 weights: no autocast copies of them are saved
        assert saved_bytes(mlp, x.to(torch.bfloat16)) == 2 * d * tokens + 2 * 2 * hidden * tokens
