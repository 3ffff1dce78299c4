"""Every GLA path against the naive recurrence, forward and every gradient.

The reference is naive_recurrent_gla in fp64 with autograd. Errors are measured as
max|actual - expected| / max|expected| per tensor (outputs, final state, and the gradients of q, k,
v, g, initial_state, with random upstream gradients for both o and the final state). Tolerances:
- fp64 chunked PyTorch: 1e-10. Both paths are exact in fp64; only summation order differs.
- fp32 (chunked PyTorch, and Triton under TRITON_INTERPRET=1): 2e-4. fp32 rounding (~6e-8) grows
  through sums over up to 257 steps and through cumulative gates: exp(b_t - b_s) is computed from
  cumulative sums that reach hundreds with extreme gates, whose rounding (|b| * 6e-8) is a relative
  error of the decay factors.
- On a GPU the Triton dots run in TF32 for fp32 inputs (10-bit mantissa): 5e-3; bf16 inputs: 3e-2.
- bf16 inputs on CPU (chunked PyTorch, fp32 accumulation, bf16 output): 2e-2 (bf16 has 8 bits).
"""
import os

import pytest
import torch

from kernels import chunk_gla, fused_recurrent_gla
from kernels.gla.chunk import chunk_gla_torch
from kernels.gla.naive import naive_recurrent_gla
from compare import assert_matches, run
from inputs import CU_SEQLENS, PACKED_T, TRITON_LENGTHS, NUM_DOCS, gla_inputs as make_inputs, gla_triton_chunk as triton_chunk
from inputs import gla_triton_fused_recurrent as triton_fused_recurrent

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 5e-3 if CUDA else 2e-4  # TF32 dots on the GPU


def reference(inputs, upstream, cu_seqlens=None):
    return run(naive_recurrent_gla, inputs, upstream, torch.float64, "cpu", cu_seqlens)


# ---- chunked PyTorch (the CPU path) ----------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("K,V", [(16, 32), (64, 16)])
def test_chunk_torch_fp64(T, scalar_gate, K, V):
    inputs, upstream = make_inputs(2, T, 2, K, V, scalar_gate, num_states=2, seed=T)
    expected = reference(inputs, upstream)
    assert_matches(run(chunk_gla_torch, inputs, upstream, torch.float64, "cpu"), expected, 1e-10)


def test_chunk_torch_fp64_blocked_path():
    """Chunks that decay by more than e^-60 take the blocked (secondary chunking) intra-chunk path."""
    inputs, upstream = make_inputs(2, 257, 2, 32, 16, scalar_gate=False, num_states=2, gates="mixed")
    expected = reference(inputs, upstream)
    assert_matches(run(chunk_gla_torch, inputs, upstream, torch.float64, "cpu"), expected, 1e-10)


@pytest.mark.parametrize("gates", ["normal", "strong", "extreme", "mixed"])
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["vector", "scalar"])
def test_chunk_torch_fp32_cu_seqlens(gates, scalar_gate):
    inputs, upstream = make_inputs(1, PACKED_T, 2, 32, 32, scalar_gate, num_states=NUM_DOCS, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run(chunk_gla_torch, inputs, upstream, torch.float32, "cpu", CU_SEQLENS), expected, 2e-4)


def test_chunk_torch_bf16():
    inputs, upstream = make_inputs(2, 100, 2, 32, 32, scalar_gate=False, num_states=2)
    actual = run(chunk_gla_torch, inputs, upstream, torch.bfloat16, "cpu")
    expected = run(naive_recurrent_gla, {n: x.bfloat16().double() for n, x in inputs.items()}, upstream,
                   torch.float64, "cpu")
    assert_matches(actual, expected, 2e-2)


def test_state_passing_equals_one_long_call():
    """Splitting a sequence and carrying final_state into initial_state is the same computation
    (what decoding and sequence parallelism rely on)."""
    inputs, _ = make_inputs(1, 150, 2, 16, 16, scalar_gate=False, num_states=1)
    q, k, v, g, h0 = (inputs[n] for n in ("q", "k", "v", "g", "initial_state"))
    o, final = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, mid = chunk_gla(q[:, :90], k[:, :90], v[:, :90], g[:, :90], initial_state=h0, output_final_state=True)
    o2, final2 = fused_recurrent_gla(q[:, 90:], k[:, 90:], v[:, 90:], g[:, 90:], initial_state=mid,
                                     output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=1e-10, atol=1e-10)


def test_no_final_state_unless_asked():
    inputs, _ = make_inputs(1, 20, 1, 16, 16, scalar_gate=True, num_states=1)
    o, final = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert final is None and o.shape == inputs["v"].shape


@pytest.mark.parametrize("bad, message", [
    (dict(g=torch.zeros(1, 8, 2, 5)), "g must be"),
    (dict(v=torch.zeros(1, 9, 2, 16)), "v must be"),
    (dict(initial_state=torch.zeros(2, 2, 16, 16)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens must rise"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(q=torch.zeros(1, 8, 2, 16), k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16),
                g=torch.zeros(1, 8, 2), initial_state=None, cu_seqlens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        chunk_gla(**args)


def test_backend_switch(monkeypatch):
    from kernels.backend import kernel_backend
    x = torch.zeros(1)
    monkeypatch.setenv("BATON_KERNELS", "torch")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("BATON_KERNELS", "auto")
    assert kernel_backend(x) == "torch"  # CPU tensors
    monkeypatch.setenv("BATON_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernel_backend(x)
    monkeypatch.setenv("BATON_KERNELS", "cuda")
    with pytest.raises(ValueError, match="BATON_KERNELS"):
        kernel_backend(x)


# ---- Triton (compiled on a GPU, TRITON_INTERPRET=1 on the CPU: fp32 only there) ----------------------

TRITON_PATHS = [pytest.param(triton_chunk, id="triton_chunk"),
                pytest.param(triton_fused_recurrent, id="triton_fused_recurrent")]
TRITON_DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]  # the interpreter's bf16 dot is wrong


def tolerance(dtype):
    return FP32_TOL if dtype == torch.float32 else 3e-2


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("T", TRITON_LENGTHS)
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton(path, scalar_gate, T, dtype):
    K, V = (32, 16) if T % 2 else (16, 64)  # both orders of K vs V over the lengths
    inputs, upstream = make_inputs(1, T, 1, K, V, scalar_gate, num_states=1, seed=T)
    expected = reference(inputs, upstream)
    assert_matches(run(path, inputs, upstream, dtype, DEVICE), expected, tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("gates", ["normal", "extreme", "mixed"])
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["vector", "scalar"])
def test_triton_chunk_cu_seqlens(scalar_gate, gates):
    inputs, upstream = make_inputs(1, PACKED_T, 1, 16, 32, scalar_gate, num_states=NUM_DOCS, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run(triton_chunk, inputs, upstream, torch.float32, DEVICE, CU_SEQLENS), expected, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["vector", "scalar"])
def test_triton_fused_recurrent_cu_seqlens(scalar_gate):
    inputs, upstream = make_inputs(1, PACKED_T, 1, 16, 16, scalar_gate, num_states=NUM_DOCS, gates="mixed")
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run(triton_fused_recurrent, inputs, upstream, torch.float32, DEVICE, CU_SEQLENS), expected,
                   FP32_TOL)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
def test_triton_batch_heads_and_wide_state():
    """Two rows of two chunks, K and V wider than one 64-wide tile and not multiples of it (masked tails)."""
    inputs, upstream = make_inputs(2, 70, 1, 96, 80, scalar_gate=False, num_states=2)
    expected = reference(inputs, upstream)
    assert_matches(run(triton_chunk, inputs, upstream, torch.float32, DEVICE), expected, FP32_TOL)


@pytest.mark.gpu
def test_entry_point_takes_triton_when_forced(monkeypatch):
    """BATON_KERNELS=triton routes the public entry point to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
    import kernels.gla.triton_chunk as triton_module
    calls = []
    original = triton_module.gla_op
    monkeypatch.setattr(triton_module, "gla_op", lambda *a: calls.append(1) or original(*a))
    inputs, _ = make_inputs(1, 20, 1, 16, 16, scalar_gate=True, num_states=1)
    q, k, v, g = (inputs[n].float().to(DEVICE) for n in ("q", "k", "v", "g"))
    o, _ = chunk_gla(q, k, v, g)
    expected, _ = naive_recurrent_gla(q, k, v, g)
    assert calls == [1]
    torch.testing.assert_close(o, expected, rtol=FP32_TOL, atol=FP32_TOL)
