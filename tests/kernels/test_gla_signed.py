"""GLA with a signed scalar decay (kernels/gla/signed.py: Mamba2 with negative eigenvalues) against the naive
signed recurrence S_t = a_t S_{t-1} + k_t v_t^T in fp64, a_t in (-1, 1): the chunked PyTorch path, the Triton
ops (interpreted on CPU), the fused recurrent (decode) path, the state summary and the vector-Jacobian product,
forward and every gradient (through a), odd lengths, packed documents, initial and final state."""
import pytest
import torch

from kernels.common import sequence_bounds
from kernels.gla.signed import (chunk_gla_signed, chunk_gla_signed_vjp, fused_recurrent_gla_signed,
                                gla_signed_state_summary)
from compare import assert_matches, run
from inputs import CU_SEQLENS, PACKED_T, NUM_DOCS


def naive_signed(q, k, v, a, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    bounds = sequence_bounds(cu_seqlens, B, T)
    sequences = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, bos, eos) for bos, eos in zip(bounds, bounds[1:])]
    outputs, finals = torch.zeros_like(v), []
    for n, (row, bos, eos) in enumerate(sequences):
        S = initial_state[n] if initial_state is not None else q.new_zeros(H, K, v.shape[-1])
        for t in range(bos, eos):
            S = a[row, t][:, None, None] * S + k[row, t][:, :, None] * v[row, t][:, None, :]
            o_t = scale * (S * q[row, t][:, :, None]).sum(1)
            outputs = outputs.index_put((torch.tensor(row), torch.tensor(t)), o_t)
        finals.append(S)
    return outputs, torch.stack(finals) if output_final_state else None


def through_log(op):
    """The op called as the mixers call it: g = log|a| and sign(a), a differentiable through g."""
    def call(q, k, v, a, **kwargs):
        return op(q, k, v, a.abs().log(), torch.where(a < 0, -1.0, 1.0).to(a.dtype), **kwargs)
    return call


def signed_inputs(B, T, H, K, V, num_states, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    magnitude = 0.3 + 0.7 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    a = torch.where(torch.rand(B, T, H, generator=gen) < 0.5, -magnitude, magnitude)
    inputs = dict(q=rand(B, T, H, K), k=rand(B, T, H, K) / K ** 0.5, v=rand(B, T, H, V), a=a,
                  initial_state=rand(num_states, H, K, V))
    upstream = dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V))
    return inputs, upstream


@pytest.mark.parametrize("T", [1, 15, 100])
def test_chunk_torch_fp64(T):
    inputs, upstream = signed_inputs(2, T, 2, 16, 8, num_states=2, seed=T)
    expected = run(naive_signed, inputs, upstream, torch.float64, "cpu")
    assert_matches(run(through_log(chunk_gla_signed), inputs, upstream, torch.float64, "cpu"), expected, 1e-10)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_chunk_fp32_cu_seqlens(kernels, monkeypatch, nan_buffers):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    inputs, upstream = signed_inputs(1, PACKED_T, 2, 16, 16, num_states=NUM_DOCS)
    expected = run(naive_signed, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    assert_matches(run(through_log(chunk_gla_signed), inputs, upstream, torch.float32, "cpu", CU_SEQLENS),
                   expected, 2e-4)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_recurrent_cu_seqlens(kernels, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    inputs, upstream = signed_inputs(1, PACKED_T, 2, 16, 16, num_states=NUM_DOCS, seed=1)
    expected = run(naive_signed, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    assert_matches(run(through_log(fused_recurrent_gla_signed), inputs, upstream, torch.float32, "cpu",
                       CU_SEQLENS), expected, 2e-4)


def test_state_summary_composes_with_any_initial_state():
    """final(S_0) = transition * S_0 + S_local per sequence: what sequence parallelism combines."""
    inputs, _ = signed_inputs(1, PACKED_T, 2, 16, 8, num_states=NUM_DOCS, seed=2)
    q, k, v, a, s0 = (inputs[name] for name in ("q", "k", "v", "a", "initial_state"))
    g, sign = a.abs().log(), torch.where(a < 0, -1.0, 1.0).double()
    state, transition = gla_signed_state_summary(k, v, g, sign, CU_SEQLENS)
    _, final = naive_signed(q, k, v, a, initial_state=s0, output_final_state=True, cu_seqlens=CU_SEQLENS)
    torch.testing.assert_close(transition[..., None, None] * s0 + state, final, rtol=1e-10, atol=1e-10)
    assert (transition < 0).any() and (transition > 0).any()  # signs of both kinds were exercised


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_vjp_is_autograds(kernels, monkeypatch):
    """The gradients recomputation around the scan takes from chunk_gla_signed_vjp, without the forward."""
    monkeypatch.setenv("BATON_KERNELS", kernels)
    inputs, upstream = signed_inputs(1, PACKED_T, 2, 16, 16, num_states=1, seed=3)
    q, k, v = (inputs[name].float().requires_grad_() for name in "qkv")
    g = inputs["a"].abs().log().float().requires_grad_()
    sign = torch.where(inputs["a"] < 0, -1.0, 1.0).float()
    do = upstream["o"].float()
    o, _ = chunk_gla_signed(q, k, v, g, sign, cu_seqlens=CU_SEQLENS)
    expected = torch.autograd.grad(o, (q, k, v, g), do)
    dq, dk, dv, (dg, dsign), d_initial = chunk_gla_signed_vjp(q, k, v, g, sign, do, cu_seqlens=CU_SEQLENS)
    for actual, wanted in zip((dq, dk, dv, dg), expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    assert not dsign.any() and d_initial is None  # no initial state given, none to differentiate
