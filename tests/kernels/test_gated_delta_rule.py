"""Every gated-delta-rule path against the naive recurrence, forward and every gradient.

The reference is naive_gated_delta_rule in fp64 with autograd (itself checked against the matrix form of the
recurrence). q and k are L2-normalised as the caller does; beta is drawn from (0, 2), so some steps have a
negative eigenvalue. Errors are max|actual - expected| / max|expected| per tensor (output, final state, and
the gradients of q, k, v, g, beta, initial_state, with random upstream gradients for both o and the final
state). Tolerances:
- fp64 chunked PyTorch: 1e-10. Both paths are exact in fp64; only the summation order differs.
- fp32 (chunked PyTorch, and Triton under TRITON_INTERPRET=1): 2e-4; measured worst 8e-5 (dg with extreme
  gates), 2.5e-5 otherwise. fp32 rounding (~6e-8) grows through the triangular solve of the WY form (with
  nearly parallel keys and beta near 2, (I + A)^{-1} is far from the identity), through sums over up to 129
  steps, and through cumulative gates: exp(gamma_t - gamma_s) is computed from within-chunk cumulative sums
  that reach -2500 with extreme gates, whose rounding (|gamma| * 6e-8) is a relative error of every decay;
  with such gates dg is itself made only of those tiny decays.
- On a GPU the Triton dots of fp32 inputs run in exact fp32 ("ieee"), so the fp32 tolerance holds there too;
  bf16 inputs: 3e-2 (8-bit mantissa operands, fp32 accumulation).
- bf16 inputs on CPU (chunked PyTorch, fp32 inside, bf16 output) against the reference on the same
  bf16-rounded inputs: 2e-2.
"""
import functools

import pytest
import torch

from kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from kernels.gated_delta_rule.chunk import chunk_gated_delta_rule_torch
from kernels.gated_delta_rule.naive import naive_gated_delta_rule
from compare import assert_matches, run
from inputs import CU_SEQLENS, PACKED_T, TRITON_LENGTHS, gated_delta_rule_inputs as make_inputs
from inputs import gated_delta_rule_triton_chunk as triton_chunk
from inputs import gated_delta_rule_triton_fused_recurrent as triton_fused_recurrent

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 2e-4


PATHS = {"torch": chunk_gated_delta_rule_torch, "triton_chunk": triton_chunk,
         "triton_fused_recurrent": triton_fused_recurrent}


@functools.cache
def case(B, T, H, K, V, gates="normal", packed=False, seed=0):
    """Inputs, upstream gradients and the fp64 reference results, shared by every path tested on them."""
    cu_seqlens = CU_SEQLENS if packed else None
    num_states = len(CU_SEQLENS) - 1 if packed else B
    inputs, upstream = make_inputs(B, T, H, K, V, num_states, gates, seed)
    expected = run(naive_gated_delta_rule, inputs, upstream, torch.float64, "cpu", cu_seqlens)
    return inputs, upstream, cu_seqlens, expected


def test_naive_is_the_recurrence():
    """The reference against the definition, written as explicit K x K matrices."""
    inputs, _ = make_inputs(2, 5, 2, 8, 4, num_states=2)
    q, k, v, g, beta, state = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o, final = naive_gated_delta_rule(q, k, v, g, beta, scale=0.5, initial_state=state, output_final_state=True)
    eye = torch.eye(8, dtype=torch.float64)
    for t in range(5):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = g[:, t, :, None, None].exp() * (eye - bt * kt[..., :, None] * kt[..., None, :])
        state = transition @ state + bt * kt[..., :, None] * v[:, t, :, None, :]
        torch.testing.assert_close(o[:, t], 0.5 * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    torch.testing.assert_close(final, state)


# ---- every path against the reference -------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("K,V", [(16, 32), (64, 16)])
def test_chunk_torch_fp64(T, K, V):
    inputs, upstream, _, expected = case(2, T, 2, K, V, seed=T)
    assert_matches(run(chunk_gated_delta_rule_torch, inputs, upstream, torch.float64, "cpu"), expected, 1e-10)


# The fused recurrent kernel's backward is the chunked one: one gate pattern is enough for its forward.
@pytest.mark.parametrize("path,gates", [(path, gates) for path in ("torch", "triton_chunk")
                                        for gates in ("normal", "extreme", "mixed", "aligned", "none")]
                         + [("triton_fused_recurrent", gates) for gates in ("mixed", "none")])
@pytest.mark.gpu
def test_fp32_cu_seqlens(path, gates, nan_buffers):
    inputs, upstream, cu_seqlens, expected = case(1, PACKED_T, 1, 16, 32, gates, packed=True)
    device = "cpu" if path == "torch" else DEVICE
    assert_matches(run(PATHS[path], inputs, upstream, torch.float32, device, cu_seqlens), expected, FP32_TOL)


# (K, V) by length; then K = 96 and 200: the kernels' 64-wide key blocks, two and four of them, the last partial.
HEAD_DIMS = {1: (16, 16), 15: (32, 16), 64: (16, 32), 100: (16, 16), 257: (16, 16)}


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,V", [(T, *HEAD_DIMS[T]) for T in TRITON_LENGTHS]
                         + [(70, 64, 64), (70, 96, 80), (70, 200, 24)])
def test_chunk_triton_fp32(T, K, V, nan_buffers):
    inputs, upstream, _, expected = case(2, T, 1, K, V, seed=T)
    assert_matches(run(triton_chunk, inputs, upstream, torch.float32, DEVICE), expected, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 37])
def test_fused_recurrent_triton_fp32(T, nan_buffers):
    inputs, upstream, _, expected = case(2, T, 1, 16, 32, "extreme", seed=T)
    assert_matches(run(triton_fused_recurrent, inputs, upstream, torch.float32, DEVICE), expected, FP32_TOL)


def test_chunk_torch_bf16():
    inputs, upstream = make_inputs(2, 100, 2, 32, 32, num_states=2)
    actual = run(chunk_gated_delta_rule_torch, inputs, upstream, torch.bfloat16, "cpu")
    expected = run(naive_gated_delta_rule, {n: x.bfloat16().double() for n, x in inputs.items()}, upstream,
                   torch.float64, "cpu")
    assert_matches(actual, expected, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("fn", [triton_chunk, triton_fused_recurrent], ids=["chunk", "fused_recurrent"])
def test_triton_bf16(fn):
    inputs, upstream = make_inputs(2, 300, 4, 64, 64, num_states=2)
    expected = run(naive_gated_delta_rule, {n: x.bfloat16().double() for n, x in inputs.items()}, upstream,
                   torch.float64, "cpu")
    assert_matches(run(fn, inputs, upstream, torch.bfloat16, DEVICE), expected, 3e-2)


# ---- the contract ---------------------------------------------------------------------------------

def test_state_passing_equals_one_long_call():
    """Splitting a sequence and carrying final_state into initial_state is the same computation
    (what decoding and sequence parallelism rely on)."""
    inputs, _ = make_inputs(1, 150, 2, 16, 16, num_states=1)
    q, k, v, g, beta, h0 = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o1, mid = chunk_gated_delta_rule(q[:, :90], k[:, :90], v[:, :90], g[:, :90], beta[:, :90], initial_state=h0,
                                     output_final_state=True)
    o2, final2 = fused_recurrent_gated_delta_rule(q[:, 90:], k[:, 90:], v[:, 90:], g[:, 90:], beta[:, 90:],
                                                  initial_state=mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entry_points_without_states(backend, monkeypatch):
    """The training call (no initial state, no final state) through the entry points, on either backend
    (BATON_KERNELS=triton runs the Triton kernels here in the interpreter)."""
    monkeypatch.setenv("BATON_KERNELS", backend)
    inputs, upstream = make_inputs(2, 80, 1, 16, 16, num_states=2)
    names = ("q", "k", "v", "g", "beta")
    expected_leaves = [inputs[n].clone().requires_grad_() for n in names]
    o = naive_gated_delta_rule(*expected_leaves)[0]
    expected = [o, *torch.autograd.grad((o * upstream["o"]).sum(), expected_leaves)]
    for op in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        leaves = [inputs[n].float().requires_grad_() for n in names]
        o, final = op(*leaves)
        actual = [o, *torch.autograd.grad((o * upstream["o"].float()).sum(), leaves)]
        assert final is None
        for name, a, e in zip(("o", *names), actual, expected):
            error = ((a.double() - e).abs().max() / e.abs().max()).item()
            assert error <= FP32_TOL, f"{op.__name__} {name}: relative error {error:.2e}"


def test_no_final_state_unless_asked():
    inputs, _ = make_inputs(1, 20, 1, 16, 16, num_states=1)
    o, final = chunk_gated_delta_rule(*(inputs[n] for n in ("q", "k", "v", "g", "beta")))
    assert final is None and o.shape == inputs["v"].shape


@pytest.mark.parametrize("bad, message", [
    (dict(g=torch.zeros(1, 8, 2, 16)), "g must be"),
    (dict(beta=torch.zeros(1, 8)), "beta must be"),
    (dict(v=torch.zeros(1, 9, 2, 16)), "v must be"),
    (dict(initial_state=torch.zeros(2, 2, 16, 16)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens must rise"),
])
@pytest.mark.parametrize("op", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule])
def test_bad_input_is_a_clear_error(op, bad, message):
    args = dict(q=torch.zeros(1, 8, 2, 16), k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16),
                g=torch.zeros(1, 8, 2), beta=torch.zeros(1, 8, 2), initial_state=None, cu_seqlens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        op(**args)
